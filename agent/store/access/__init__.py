"""Who may see what: the access rules, the Access gRPC service, people's and
service tokens, ID-token verification, and the trail of refused requests."""
