"""Local tooling that is never deployed: Azurite launcher, loopback fakes of the managed
identity endpoint and of Defender, and a local stand-in for the Functions host."""
