"""Large media by URL: a bounded, safe fetcher (model side) and an uploader (client side)."""
