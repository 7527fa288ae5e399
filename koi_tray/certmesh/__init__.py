"""The certmesh domain: CA, roster, invites, leaves, trust bundle, member state.

Pure Python over `cryptography` and the standard library; no Qt, no aiohttp.
"""
