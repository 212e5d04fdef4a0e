"""The data path: `loader` (the WebDataset pipeline), `shards` (writing shards and manifests), `remote`
(pipe:, http(s)://, s3:// with timeouts and retries), `make_shards` (fne-make-shards), `recipes` (real captioned
sets offline) and `digits` (the demo's built-in set)."""
