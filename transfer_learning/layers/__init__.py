"""The layer sweep: which block's features suit this data (params section `layers`)."""
