"""Several machines behind one gateway: the `hosts:` entries, how a host is pinned and
checked, and the view of each host's models and queues that routing reads."""
