"""A slow reader of a fast channel holds at most about one receive window.

asyncssh re-opens a channel's window whenever it hands a packet to a reader that had
paused, counting what is still queued in the channel as read; ``shell.start_request``
corrects that for every channel it starts (``shell.bound_receive_window``). Without
it, fetching 1 GiB by rsync grew the holder by 90-250 MiB (README *Measured*)."""

from __future__ import annotations

import asyncio

import asyncssh

from remote_exec.ssh import shell

SIZE = 32 << 20


def test_a_slow_reader_keeps_the_channel_queue_within_the_window(sshd) -> None:
    site = sshd.site_definition()

    async def scenario() -> tuple[int, int, int, bool]:
        async with asyncssh.connect("127.0.0.1", port=site["port"], username=site["user"],
                                    client_keys=[site["identity_file"]],
                                    known_hosts=site["known_hosts"]) as conn:
            started = await shell.start_request(
                conn, shell.sh_request(f"head -c {SIZE} /dev/zero"), encoding=None)
            channel = started.process.channel
            assert channel._deliver_data.__name__ == "bounded", "the correction did not apply"
            most = got = 0
            while True:
                data = await started.process.stdout.read(65536)
                if not data:
                    break
                got += len(data)
                most = max(most, sum(len(item[0]) for item in channel._recv_buf))
                await asyncio.sleep(0.002)  # a reader slower than the loopback sender
            await started.process.wait()
            return got, most, channel.get_recv_window(), bool(channel._recv_buf)

    got, most, window, left = asyncio.run(scenario())
    assert got == SIZE and not left
    assert most <= window + 65536, f"{most} bytes queued in a channel of window {window}"
