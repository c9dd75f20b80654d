// A real OpenID provider (npm oidc-provider) for callrec's web tests.
//
// Configured by one JSON file (argv[2]): {tls_cert, tls_key, jwks (private JWK set),
// client_id, client_secret, redirect_uris, id_token_ttl_s, ready_file}. Listens on 127.0.0.1:0 over
// HTTPS and writes {"issuer": "https://127.0.0.1:<port>"} to conf.ready_file when ready.
// The sign-in page is a plain form: the test types the account id it wants (any id is
// accepted: the directory, not the provider, decides who gets in). PKCE is required.
// Dev-only keys and accounts: never for anything but tests and the demo.
import fs from 'node:fs';
import https from 'node:https';
import Provider from 'oidc-provider';

const conf = JSON.parse(fs.readFileSync(process.argv[2], 'utf8'));
let provider;

const page = (uid, title) => `<!doctype html><html lang="en"><head><meta charset="utf-8">
<title>Company sign-in</title><style>body{font:16px sans-serif;margin:4rem auto;max-width:22rem}
input,button{font:inherit;padding:.4rem;width:100%;margin:.3rem 0}</style></head><body>
<h1>${title}</h1><form method="post" action="/interaction/${uid}/login">
<label for="login">Account</label><input id="login" name="login" autofocus>
<button type="submit">Sign in</button></form></body></html>`;

async function readForm(req) {
  let body = '';
  for await (const chunk of req) {
    body += chunk;
    if (body.length > 4096) throw new Error('form too large');
  }
  return new URLSearchParams(body);
}

async function consent(req, res, details) {
  const { prompt, params, session } = details;
  const grant = new provider.Grant({ accountId: session.accountId, clientId: params.client_id });
  if (prompt.details.missingOIDCScope) grant.addOIDCScope(prompt.details.missingOIDCScope.join(' '));
  if (prompt.details.missingOIDCClaims) grant.addOIDCClaims(prompt.details.missingOIDCClaims);
  const grantId = await grant.save();
  await provider.interactionFinished(req, res, { consent: { grantId } }, { mergeWithLastSubmission: true });
}

async function interaction(req, res) {
  const details = await provider.interactionDetails(req, res);
  if (req.method === 'POST' && req.url.endsWith('/login')) {
    const login = (await readForm(req)).get('login') || '';
    await provider.interactionFinished(req, res, { login: { accountId: login } }, { mergeWithLastSubmission: false });
  } else if (details.prompt.name === 'consent') {
    await consent(req, res, details);
  } else {
    res.writeHead(200, { 'content-type': 'text/html; charset=utf-8' });
    res.end(page(details.uid, 'Company sign-in'));
  }
}

const server = https.createServer(
  { cert: fs.readFileSync(conf.tls_cert), key: fs.readFileSync(conf.tls_key) },
  (req, res) => {
    if (req.url.startsWith('/interaction/')) {
      interaction(req, res).catch((err) => {
        res.writeHead(400, { 'content-type': 'text/plain' });
        res.end(`interaction failed: ${err.message}`);
      });
    } else {
      provider.callback()(req, res);
    }
  },
);

server.listen(0, '127.0.0.1', () => {
  const issuer = `https://127.0.0.1:${server.address().port}`;
  provider = new Provider(issuer, {
    clients: [{
      client_id: conf.client_id,
      client_secret: conf.client_secret,
      redirect_uris: conf.redirect_uris,
      grant_types: ['authorization_code', 'refresh_token'],
      response_types: ['code'],
    }],
    pkce: { required: () => true },
    jwks: conf.jwks,
    findAccount: async (ctx, id) => ({ accountId: id, claims: async () => ({ sub: id }) }),
    interactions: { url: (ctx, i) => `/interaction/${i.uid}` },
    features: { devInteractions: { enabled: false }, revocation: { enabled: true } },
    // Like Entra ID: a refresh token when the web asks for offline_access.
    issueRefreshToken: async (ctx, client, code) =>
      client.grantTypeAllowed('refresh_token') && code.scopes.has('offline_access'),
    cookies: { keys: ['callrec-tests-only'] },
    ttl: { IdToken: conf.id_token_ttl_s || 3600 },
    claims: { openid: ['sub'] },
    scopes: ['openid', 'offline_access'],
  });
  provider.on('server_error', (ctx, err) => console.error('server_error', err.message));
  fs.writeFileSync(conf.ready_file, JSON.stringify({ issuer }));
});
