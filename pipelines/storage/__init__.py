"""Object storage: filesystems, retries and errors (access), and the WebDataset shard format."""
