"""The corpus side of polyko: Ray Data cleaning pipeline and packed token shards."""
