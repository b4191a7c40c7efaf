/**
 * Connection settings: TLS (CA, client certificate and key, server name) and a bearer token,
 * as `credentials` and `clientOptions` for `Producer` and `Worker`.
 *
 * The token is added by a client interceptor as `authorization: Bearer <token>` to every call,
 * the Lease stream included. grpc-js attaches call credentials to TLS channels only, and a
 * development broker on loopback serves plaintext, so an interceptor serves both; the token is
 * sent only over TLS or to a loopback address, never in the clear over a network.
 *
 * @module
 */

import { readFileSync, statSync } from 'node:fs';
import { isIP } from 'node:net';

import * as grpc from '@grpc/grpc-js';

/**
 * @typedef {object} ConnectionOptions
 * @property {boolean} [tls] connect with TLS (implied by any of the files or serverName);
 *   without caFile the broker is verified against Node's CA certificates
 * @property {string} [caFile] PEM CA certificates to verify the broker with
 * @property {string} [certFile] PEM client certificate, for a broker that requires one (mTLS)
 * @property {string} [keyFile] PEM private key of certFile
 * @property {string} [serverName] the name to verify the broker's certificate against
 * @property {string} [token] bearer token sent on every call
 * @property {string} [tokenFile] a file holding the token (re-read when it changes)
 */

/**
 * @typedef {object} Connection
 * @property {grpc.ChannelCredentials} credentials
 * @property {grpc.ClientOptions} clientOptions channel options and interceptors
 */

/** @param {string} what @param {string} path @returns {Buffer} */
function readFile(what, path) {
  try {
    return readFileSync(path);
  } catch (error) {
    throw new Error(`cannot read ${what} ${path}: ${/** @type {any} */ (error).code ?? error}`);
  }
}

/** @param {string} token @param {string} source @returns {string} */
function checkToken(token, source) {
  const trimmed = token.trim();
  if (!trimmed) throw new Error(`the token from ${source} is empty`);
  if (!/^[\x21-\x7e]+$/.test(trimmed)) {
    throw new Error(`the token from ${source} has characters a header cannot carry`);
  }
  return trimmed;
}

/**
 * A function returning the token; a file's is read again when its size or mtime changed.
 *
 * @param {string | undefined} token
 * @param {string | undefined} tokenFile
 * @returns {(() => string) | undefined}
 */
function tokenSource(token, tokenFile) {
  if (token !== undefined && tokenFile !== undefined) {
    throw new Error('give a token or a token file, not both');
  }
  if (token !== undefined) {
    const value = checkToken(token, 'the token option');
    return () => value;
  }
  if (tokenFile === undefined) return undefined;
  let signature = '';
  let value = '';
  const read = () => {
    const st = statSync(tokenFile, { throwIfNoEntry: false });
    if (!st) throw new Error(`cannot read token file ${tokenFile}: ENOENT`);
    const now = `${st.ino}:${st.size}:${st.mtimeMs}`;
    if (now !== signature) {
      value = checkToken(readFile('token file', tokenFile).toString('ascii'), `token file ${tokenFile}`);
      signature = now;
    }
    return value;
  };
  read(); // a missing or empty file fails now, not at the first call
  return read;
}

/**
 * True when the target is `localhost`, loopback IP addresses or a Unix socket.
 *
 * @param {string} target
 * @returns {boolean}
 */
export function isLocalTarget(target) {
  if (target.startsWith('unix:')) return true;
  let rest = target;
  let hosts;
  if (rest.startsWith('ipv4:') || rest.startsWith('ipv6:')) {
    hosts = rest.slice(5).split(',').map((entry) => entry.slice(0, entry.lastIndexOf(':')));
  } else {
    if (rest.startsWith('dns:')) rest = rest.slice(4).replace(/^\/\/[^/]*\//, '').replace(/^\/+/, '');
    const colon = rest.lastIndexOf(':');
    if (colon < 0) return false;
    hosts = [rest.slice(0, colon)];
  }
  return hosts.every((raw) => {
    const host = raw.replace(/^\[/, '').replace(/\]$/, '');
    if (host === 'localhost') return true;
    if (isIP(host) === 4) return host.startsWith('127.');
    if (isIP(host) === 6) return host === '::1' || host === '0:0:0:0:0:0:0:1';
    return false;
  });
}

/**
 * Credentials and client options for a target.
 *
 * @param {string} target the broker's `host:port` (or any grpc-js target)
 * @param {ConnectionOptions} [options]
 * @returns {Connection}
 */
export function connection(target, options = {}) {
  const { caFile, certFile, keyFile, serverName } = options;
  if ((certFile === undefined) !== (keyFile === undefined)) {
    throw new Error('TLS: give the client certificate and its key together');
  }
  const tls = Boolean(options.tls || caFile || certFile || serverName);
  /** @type {grpc.ClientOptions} */
  const clientOptions = {};
  const credentials = tls
    ? grpc.credentials.createSsl(
        caFile === undefined ? null : readFile('TLS CA file', caFile),
        keyFile === undefined ? null : readFile('TLS client key file', keyFile),
        certFile === undefined ? null : readFile('TLS client certificate file', certFile),
      )
    : grpc.credentials.createInsecure();
  if (serverName) clientOptions['grpc.ssl_target_name_override'] = serverName;
  const token = tokenSource(options.token, options.tokenFile);
  if (token !== undefined) {
    if (!tls && !isLocalTarget(target)) {
      throw new Error(
        `a token is sent only over TLS or to this machine, and ${target} is neither: ` +
          'configure TLS (caFile, or TASKBROKER_TLS_CA)',
      );
    }
    clientOptions.interceptors = [bearerInterceptor(token)];
  }
  return { credentials, clientOptions };
}

/**
 * An interceptor adding `authorization: Bearer <token>` to every call.
 *
 * @param {() => string} token
 * @returns {grpc.Interceptor}
 */
function bearerInterceptor(token) {
  return (options, nextCall) =>
    new grpc.InterceptingCall(nextCall(options), {
      start(metadata, listener, next) {
        metadata.set('authorization', `Bearer ${token()}`);
        next(metadata, listener);
      },
    });
}

/**
 * Connection options from TASKBROKER_TLS_CA, TASKBROKER_TLS_CLIENT_CERT,
 * TASKBROKER_TLS_CLIENT_KEY, TASKBROKER_TLS_SERVER_NAME, TASKBROKER_TLS (1: TLS with Node's CAs),
 * TASKBROKER_TOKEN and TASKBROKER_TOKEN_FILE, as the Python SDK and CLI read them.
 *
 * @param {Record<string, string | undefined>} [env]
 * @returns {ConnectionOptions}
 */
export function connectionOptionsFromEnv(env = process.env) {
  const get = (/** @type {string} */ name) => env[name] || undefined;
  return {
    tls: ['1', 'true', 'yes', 'on'].includes((env.TASKBROKER_TLS ?? '').toLowerCase()),
    caFile: get('TASKBROKER_TLS_CA'),
    certFile: get('TASKBROKER_TLS_CLIENT_CERT'),
    keyFile: get('TASKBROKER_TLS_CLIENT_KEY'),
    serverName: get('TASKBROKER_TLS_SERVER_NAME'),
    token: get('TASKBROKER_TOKEN'),
    tokenFile: get('TASKBROKER_TOKEN_FILE'),
  };
}
