"""Language models: backends, the fast drafter, the slow continuer, the verifier and the relay."""
