"""The edge: command-line entry points and the wiring of `cai up`, `cai eval`, `cai serve` and `cai train`.

Everything here may import the core (`cai`), the services and the trainer; nothing there imports this.
"""
