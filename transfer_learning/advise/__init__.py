"""params `advise` (stage advise): how close the data is to the pretraining data, and the strategy it suggests."""
