"""Fleet inventory: sites, devices, capabilities and tiers, labels, groups and selectors.

The ground floor of the console: it imports no other app of the project.
"""
