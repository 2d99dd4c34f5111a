"""Fault-injection test kit shared by the tests and `dejima chaos`: a TCP proxy between peers, a proxied cluster."""
