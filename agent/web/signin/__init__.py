"""Who is signed in to the web: the sign-in flow, the store's WhoAmI, the ID token's
refresh and sign-out (``auth``), the web's own OpenID Connect client (``oidc``), the
demo's loopback issuer (``local``, ``[web.local]``) and the server-side sessions with
their CSRF tokens (``sessions``)."""
