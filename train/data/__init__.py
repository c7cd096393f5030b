"""The training images: read from their source (sources), decoded from pictures (pictures), described once for the
networks and every record (images), and dealt to the ranks on the device (sharding)."""
