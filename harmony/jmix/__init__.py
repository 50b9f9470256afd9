"""JMIX packages: the package model and builder, validation, and the package store."""
