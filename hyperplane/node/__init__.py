"""One node: starting and stopping its data path, its addresses, and the agent daemon that runs it."""
