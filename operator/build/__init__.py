"""Pure builders: (spec, references) in, Kubernetes manifests out. No I/O anywhere in this package."""
