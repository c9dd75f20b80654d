"""``callrec web``: the people's web — sign-in with the company's OpenID provider,
search, the player, and the privacy officer's pages — acting on the store's Access
service as the signed-in person. It holds no catalog, blob store or key."""
