"""Stage package: the router: the candidates for a request, in the order of the current strategy."""
