"""The ``pull`` backend: a site's poller takes the run from the queue server over HTTPS
(see ``docs/pull-protocol.md``)."""
