"""Deliveries: where accepted mail goes.  Each is an ordinary IDelivery, written the way
a user writes one; none reaches into the server."""
