"""The node supervisor and the app runtime processes it starts."""
