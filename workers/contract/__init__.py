"""What the two planes agree on: job specs, the artifact store's addresses, the reporter interface."""
