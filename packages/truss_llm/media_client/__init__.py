"""Large media, client side: upload to object storage, pre-sign, send (`truss-llm send`).

The model side (the safe fetcher that reads those URLs) is `truss_llm.media`; the two folders
are the two ends of the wire and share nothing but the URL.
"""
