"""NAT gateways: their configuration and how it is written into the data path's maps."""
