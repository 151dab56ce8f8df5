"""Stage package: the response-cache lookup (cache-lookup).

A hit answers at once, a miss goes on, an identical request waits behind its leader.
"""
