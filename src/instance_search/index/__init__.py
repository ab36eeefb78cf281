"""The index on disk: the SQLite catalogue and segment files (store), compact conv maps (compact), FAISS search
(faiss_backend), check and repair (repair), distributed extraction and sharded search on Ray (distributed)."""
