"""The root-launched Jupyter Server extension (REST API, policy, audit).

Not built yet: see the server-extension issue. The engine it will use is
``pipefork_kernel.Engine``.
"""
