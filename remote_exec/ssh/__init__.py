"""SSH plumbing: one asyncssh connection per run, SFTP, and rsync tunnelled through it."""
