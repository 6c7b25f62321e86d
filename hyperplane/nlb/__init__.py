"""Network load balancers: configuration, Maglev tables, health checks, and how they are written into the maps."""
