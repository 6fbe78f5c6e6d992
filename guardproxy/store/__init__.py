"""guardproxy's own tables in the upstream database (schema ``guardproxy``)."""
