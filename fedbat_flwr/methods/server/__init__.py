"""The server side of the methods whose server sends and aggregates in its own way (FedBiF,
FedPM): imported by their `Method.server_part` only, so a ClientApp never loads them."""
