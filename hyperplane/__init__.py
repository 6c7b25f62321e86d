"""hyperplane: an XDP flow-tracking NAT gateway and L4 load balancer."""
__version__ = "0.1.0"
