// The TypeScript SDK's own client against the servers test_step_up.py runs. It connects with OAuth, calls
// list_projects, then delete_project (a 403 insufficient_scope step-up), then forbidden (a scope the
// authorization server never grants), and prints one JSON object saying what it saw; never a token.
//
// Usage: node step_up.mjs PACKAGE GENERATION MCP_URL ISSUER REDIRECT_URI
//   PACKAGE     @modelcontextprotocol/client (the SDK's v2 client) or @modelcontextprotocol/sdk (v1)
//   GENERATION  2026-07-28 (server/discover; v2 only) or 2025-11-25 (the initialize handshake)
import { randomUUID } from "node:crypto";

const [sdk, generation, url, issuer, redirectUri] = process.argv.slice(2);

const { Client, StreamableHTTPClientTransport, UnauthorizedError } =
  sdk === "@modelcontextprotocol/client"
    ? await import("@modelcontextprotocol/client")
    : {
        ...(await import("@modelcontextprotocol/sdk/client/index.js")),
        ...(await import("@modelcontextprotocol/sdk/client/streamableHttp.js")),
        ...(await import("@modelcontextprotocol/sdk/client/auth.js")),
      };

// The SDK's OAuthClientProvider, in memory. Its stand-in browser opens the authorization URL and reads
// where it is sent back to, as a user agent would; the app then hands the code to transport.finishAuth,
// which is how both SDK versions complete an interactive authorization.
class MemoryProvider {
  authorizations = 0;
  get redirectUrl() {
    return redirectUri;
  }
  get clientMetadata() {
    return {
      client_name: "step-up test (TypeScript)",
      redirect_uris: [redirectUri],
      grant_types: ["authorization_code", "refresh_token"],
      response_types: ["code"],
      token_endpoint_auth_method: "client_secret_post",
    };
  }
  state() {
    this.expectedState = randomUUID();
    return this.expectedState;
  }
  clientInformation() {
    return this.client;
  }
  saveClientInformation(client) {
    this.client = client;
  }
  tokens() {
    return this.stored;
  }
  saveTokens(tokens) {
    this.stored = tokens;
  }
  saveCodeVerifier(verifier) {
    this.verifier = verifier;
  }
  codeVerifier() {
    return this.verifier;
  }
  // v2 binds the callback to the authorization server it discovered (SEP-2352); v1 never asks.
  saveDiscoveryState(state) {
    this.discovery = state;
  }
  discoveryState() {
    return this.discovery;
  }
  async redirectToAuthorization(authorizationUrl) {
    this.authorizations += 1;
    const response = await fetch(authorizationUrl, { redirect: "manual", signal: AbortSignal.timeout(10_000) });
    const back = new URL(response.headers.get("location"));
    if (back.origin + back.pathname !== redirectUri) throw new Error("sent back elsewhere");
    if (back.searchParams.has("error")) throw new Error(`authorization refused: ${back.searchParams.get("error")}`);
    if (back.searchParams.get("state") !== this.expectedState) throw new Error("state mismatch");
    this.code = back.searchParams.get("code");
    this.iss = back.searchParams.get("iss"); // RFC 9207: v2 checks it against the issuer in finishAuth
  }
}

const provider = new MemoryProvider();
let transport;
let client;

async function connect() {
  transport = new StreamableHTTPClientTransport(new URL(url), { authProvider: provider });
  const options = generation === "2026-07-28" ? { versionNegotiation: { mode: "auto" } } : {};
  client = new Client({ name: "step-up-test", version: "1.0.0" }, options);
  await client.connect(transport);
}

// Neither SDK version settles a challenge that needs the user by itself: it redirects the user and throws
// UnauthorizedError; the app completes the authorization and tries again. Once: a second refusal stands.
async function authorized(attempt, { reconnect = false } = {}) {
  try {
    return await attempt();
  } catch (error) {
    if (!(error instanceof UnauthorizedError) || provider.code === undefined) throw error;
    const [code, iss] = [provider.code, provider.iss];
    provider.code = undefined;
    await transport.finishAuth(code, iss);
    if (reconnect) await connect();
    return await attempt();
  }
}

function text(result) {
  if (result.isError) throw new Error(`tool error: ${result.content?.[0]?.text}`);
  return result.content[0].text;
}

const report = {};
try {
  await authorized(connect, { reconnect: true });
  report.protocolVersion = client.getNegotiatedProtocolVersion?.() ?? transport.protocolVersion ?? null;
  report.list = text(await authorized(() => client.callTool({ name: "list_projects", arguments: {} })));
  const deletion = { name: "delete_project", arguments: { name: "apollo" } };
  report.delete = text(await authorized(() => client.callTool(deletion)));
  try {
    await authorized(() => client.callTool({ name: "forbidden", arguments: {} }));
    report.forbidden = { name: "none", message: "forbidden was not refused" };
  } catch (error) {
    report.forbidden = { name: error.constructor.name, message: String(error.message) };
  }
  report.authorizations = provider.authorizations;
  await client.close();
} catch (error) {
  report.error = { name: error.constructor.name, message: String(error.message) };
}
process.stdout.write(`${JSON.stringify(report)}\n`);
process.exit(report.error ? 1 : 0);
