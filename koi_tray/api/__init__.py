"""The network edge: aiohttp routes for the HTTP and mTLS ports, and the member client."""
