"""What an experiment trains on: the task interface, reward environments, verifiable rewards."""
