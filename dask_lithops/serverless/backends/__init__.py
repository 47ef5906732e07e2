"""FaaS backends (see base.FaaSBackend)."""
