"""HTTP routers (thin: parse, call the runtime, shape the response) and what they share."""
