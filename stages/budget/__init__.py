"""Stage package: the budget gate: refuses spent scopes and reserves each request's worst-case cost."""
