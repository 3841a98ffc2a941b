"""Authentication on both sides: verifying clients, answering servers, deriving secrets."""
