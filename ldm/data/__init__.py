"""Datasets (shapes, digits, image folders, webdataset shards) and the DataModule that wraps them."""
