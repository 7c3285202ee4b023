// A real OpenID provider (oidc-provider 9.13.3) for Portcullis' SSO tests, with a plain
// username/password form instead of the development login screen so tests can drive it
// headlessly, and consent granted on login.
//
//   IDP_PORT=<port> IDP_CLIENTS='[...]' IDP_USERS='{"bob":{"password":"…","groups":["team-a"]}}' node idp.mjs
//
// `POST /test/users` with a JSON object changes users while it runs (a value replaces the
// user, `null` removes them): how the tests move someone out of a group or disable them.
//
// CI tokens (a stand-in for a CI system's OIDC JWT): a client_credentials request with
// `resource=urn:…` gets a JWT access token (`typ: at+jwt`, RS256) whose `aud` is that resource
// and which carries the claims IDP_CI_CLAIMS gives its client:
//   IDP_CI_CLAIMS='{"ci-team-a": {"claims": {"repository": "corp/app"}, "ttl": 600}}'
// The signing key is generated at every start (a new `kid`): restarting is a key rotation.
//
// Prints "idp listening on http://127.0.0.1:<port>" once it accepts connections.
import http from 'node:http';
import crypto from 'node:crypto';
import { Provider } from 'oidc-provider';

const port = Number(process.env.IDP_PORT);
if (!port) {
  console.error('IDP_PORT is required');
  process.exit(2);
}
const clients = JSON.parse(process.env.IDP_CLIENTS || '[]');
const users = JSON.parse(process.env.IDP_USERS || '{}');
const ci = JSON.parse(process.env.IDP_CI_CLAIMS || '{}');
// IDP_ISSUER and IDP_LISTEN_HOST let docker-compose run it under a name other containers and
// the user's browser both reach (conf/compose/README.md).
const issuer = process.env.IDP_ISSUER || `http://127.0.0.1:${port}`;
const signing = crypto.generateKeyPairSync('rsa', { modulusLength: 2048 }).privateKey.export({ format: 'jwk' });
signing.kid = crypto.randomUUID();
signing.use = 'sig';
signing.alg = 'RS256';

const provider = new Provider(issuer, {
  clients,
  jwks: { keys: [signing] },
  pkce: { required: () => true },
  scopes: ['openid', 'profile', 'email', 'groups', 'offline_access'],
  claims: {
    openid: ['sub'],
    profile: ['name', 'preferred_username'],
    email: ['email'],
    groups: ['groups'],
  },
  conformIdTokenClaims: false,
  cookies: { keys: ['portcullis-test-idp-cookies'] },
  features: {
    devInteractions: { enabled: false },
    deviceFlow: {
      // IDP_NO_DEVICE_FLOW=1: an IdP without RFC 8628 (the gateway then runs its own).
      enabled: !process.env.IDP_NO_DEVICE_FLOW,
      // Plain pages that say what went wrong (the defaults hide it).
      async userCodeInputSource(ctx, form, out, err) {
        const why = err ? `<p id="error">${err.error || err.name}: ${err.error_description || err.message}</p>` : '';
        ctx.body = `<!doctype html><title>Test IdP</title>${why}${form}`;
      },
      async userCodeConfirmSource(ctx, form, client, deviceInfo, userCode) {
        ctx.body = `<!doctype html><title>Test IdP</title><p>Sign in ${client.clientId} with ${userCode}?</p>${form}`;
      },
      async successSource(ctx) {
        ctx.body = '<!doctype html><title>Test IdP</title><p id="done">Signed in; return to your device.</p>';
      },
    },
    clientCredentials: { enabled: true },
    resourceIndicators: {
      enabled: true,
      defaultResource: () => undefined,
      useGrantedResource: () => true,
      getResourceServerInfo(ctx, resource, client) {
        return {
          scope: 'registry',
          audience: resource,
          accessTokenTTL: ci[client.clientId]?.ttl ?? 600,
          accessTokenFormat: 'jwt',
          jwt: { sign: { alg: 'RS256' } },
        };
      },
    },
    introspection: { enabled: true },
    revocation: { enabled: true },
  },
  async extraTokenClaims(ctx, token) {
    return token.kind === 'ClientCredentials' ? ci[token.clientId]?.claims : undefined;
  },
  interactions: { url: (ctx, interaction) => `/interaction/${interaction.uid}` },
  async findAccount(ctx, id) {
    const u = users[id];
    if (!u) return undefined;
    return {
      accountId: id,
      async claims() {
        return {
          sub: id,
          name: id,
          preferred_username: id,
          email: u.email || `${id}@example.org`,
          groups: u.groups || [],
        };
      },
    };
  },
});
provider.proxy = false;

function readBody(req) {
  return new Promise((resolve, reject) => {
    let data = '';
    req.on('data', (c) => { data += c; });
    req.on('end', () => resolve(new URLSearchParams(data)));
    req.on('error', reject);
  });
}

function page(res, status, body) {
  res.writeHead(status, { 'content-type': 'text/html; charset=utf-8' });
  res.end(`<!doctype html><title>Test IdP</title>${body}`);
}

async function interaction(req, res, uid, action) {
  const details = await provider.interactionDetails(req, res);
  if (details.uid !== uid) return page(res, 400, 'wrong interaction');
  if (req.method === 'GET') {
    return page(res, 200, `<form method="post" action="/interaction/${uid}/login">
      <input name="username"><input name="password" type="password"><button>Sign in</button></form>`);
  }
  if (req.method === 'POST' && action === 'login') {
    const form = await readBody(req);
    const username = form.get('username') || '';
    const u = users[username];
    if (!u || u.password !== form.get('password')) {
      return page(res, 401, 'wrong username or password');
    }
    const { Grant } = provider;
    const grant = details.grantId
      ? await Grant.find(details.grantId)
      : new Grant({ accountId: username, clientId: details.params.client_id });
    grant.addOIDCScope(String(details.params.scope || 'openid'));
    grant.addOIDCClaims(['sub', 'name', 'preferred_username', 'email', 'groups']);
    const grantId = await grant.save();
    return provider.interactionFinished(req, res, {
      login: { accountId: username },
      consent: { grantId },
    }, { mergeWithLastSubmission: false });
  }
  return page(res, 404, 'not found');
}

async function changeUsers(req, res) {
  let data = '';
  for await (const c of req) data += c;
  for (const [name, u] of Object.entries(JSON.parse(data))) {
    if (u === null) delete users[name];
    else users[name] = u;
  }
  res.writeHead(204);
  res.end();
}

const callback = provider.callback();
const server = http.createServer(async (req, res) => {
  if (req.method === 'POST' && req.url === '/test/users') {
    try {
      await changeUsers(req, res);
    } catch (e) {
      page(res, 400, `bad users: ${e.message}`);
    }
    return;
  }
  const m = req.url.match(/^\/interaction\/([^/?]+)(?:\/([a-z]+))?/);
  if (m) {
    try {
      await interaction(req, res, m[1], m[2]);
    } catch (e) {
      page(res, 400, `interaction failed: ${e.message}`);
    }
    return;
  }
  callback(req, res);
});
server.listen(port, process.env.IDP_LISTEN_HOST || '127.0.0.1', () => {
  console.log(`idp listening on ${issuer}`);
});
