"""Example task bundles (digits, broken), shipped as package data of ``fedmq.examples``: the demo
reads them with importlib.resources, so it runs from a wheel as from this folder."""
