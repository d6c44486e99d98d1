"""Large media by URL, model side: the bounded, safe fetcher and the content-part resolver.

The client side (upload to S3, pre-sign, `truss-llm send`) is `truss_llm.media_client`.
"""
