/**
 * Cluster TLS: who a duplex process is, proven by an x509 certificate from the cluster's CA.
 *
 * A certificate names its holder in the common name (CN) and its role in the organizational
 * unit (OU): `duplex-node`, `duplex-witness`, `duplex-admin`, `duplex-client` (an NBD client),
 * `duplex-server` (an NBD-only server). `duplex cert issue NAME --kind ROLE` writes them.
 *
 * `loadTlsFiles` reads and checks a process's CA bundle, certificate and key, with errors that
 * say what is wrong: a missing file, a key of another certificate, expired or not yet valid, not
 * issued by the CA, the wrong role or name. `TlsCredentials` keeps them current: `reload` (every
 * `reloadMs`, and on SIGHUP in the daemons) re-reads files that changed and installs a set that
 * passes the same checks, or keeps the old one and logs why. So a certificate, or the CA bundle
 * during a CA rotation, is replaced by replacing the files, with no restart. `TlsCredentials` is a
 * grpc-js CertificateProvider: servers and channels made from it use the newest set for each new
 * connection; NBD's STARTTLS takes `secureContext()` per connection.
 */
import { createPrivateKey, X509Certificate } from 'node:crypto'
import { readFileSync, statSync } from 'node:fs'
import path from 'node:path'
import tls from 'node:tls'
import type { PeerCertificate } from 'node:tls'
import * as grpc from '@grpc/grpc-js'
import { assert } from './assert.js'
import { DuplexError, errorMessage } from './errors.js'
import type { Logger } from './log.js'

export const roles = ['node', 'witness', 'admin', 'client', 'server'] as const
export type Role = (typeof roles)[number]

/** The OU a certificate of `role` carries. */
export function roleUnit(role: Role): string {
  return `duplex-${role}`
}

/** Who a certificate names; `role` undefined: it carries no duplex OU. */
export interface Identity {
  name: string
  role: Role | undefined
}

type Subject = Partial<Record<string, string | string[]>>

function first(value: string | string[] | undefined): string | undefined {
  return Array.isArray(value) ? value[0] : value
}

/** The identity in a certificate subject (Node's PeerCertificate.subject shape). */
export function identityOfSubject(subject: Subject | undefined): Identity | undefined {
  const name = first(subject?.CN)
  if (name === undefined || name.length === 0) return undefined
  const units = subject?.OU
  const unitList = units === undefined ? [] : Array.isArray(units) ? units : [units]
  const role = roles.find((r) => unitList.includes(roleUnit(r)))
  return { name, role }
}

/** X509Certificate.subject ("CN=a1\nOU=duplex-node") as a subject record. */
function parseSubject(text: string): Subject {
  const subject: Record<string, string[]> = {}
  for (const line of text.split('\n')) {
    const at = line.indexOf('=')
    if (at <= 0) continue
    const key = line.slice(0, at)
    ;(subject[key] ??= []).push(line.slice(at + 1))
  }
  return subject
}

function identityOfCertificate(cert: X509Certificate): Identity | undefined {
  return identityOfSubject(parseSubject(cert.subject))
}

/** "a1 (duplex-node)", for messages. */
export function describeIdentity(identity: Identity | undefined): string {
  if (identity === undefined) return 'a certificate without a common name'
  return `${identity.name} (${identity.role === undefined ? 'no duplex role' : roleUnit(identity.role)})`
}

/** What a certificate must be: its role, and its name when one is expected. */
export interface Expectation {
  role: Role
  name?: string | undefined
}

/** Why `identity` does not meet `expect`, or undefined. */
export function identityProblem(
  identity: Identity | undefined,
  expect: Expectation,
): string | undefined {
  if (identity === undefined) return 'the certificate has no common name'
  if (identity.role !== expect.role) {
    const is =
      identity.role === undefined
        ? 'has no duplex role (OU)'
        : `is a ${roleUnit(identity.role)} certificate`
    return `${identity.name}'s certificate ${is}, where a ${roleUnit(expect.role)} certificate is needed`
  }
  if (expect.name !== undefined && identity.name !== expect.name) {
    return `the certificate names ${identity.name}, not ${expect.name}`
  }
  return undefined
}

// ---------------------------------------------------------------------------------------------
// Loading and checking a process's own files

export interface TlsFiles {
  /** PEM, one or more CA certificates (several during a CA rotation); undefined: trust none. */
  ca?: string | undefined
  /** PEM, this process's certificate (then any intermediates). */
  cert: string
  /** PEM, its private key. */
  key: string
}

/**
 * The files of a credentials directory (`--credentials DIR`, written by `duplex cert issue`):
 * DIR/ca-cert.pem (the cluster CA bundle), DIR/cert.pem and DIR/key.pem.
 */
export function credentialFiles(dir: string): { ca: string; cert: string; key: string } {
  return {
    ca: path.join(dir, 'ca-cert.pem'),
    cert: path.join(dir, 'cert.pem'),
    key: path.join(dir, 'key.pem'),
  }
}

export interface TlsMaterial {
  ca: Buffer | undefined
  cert: Buffer
  key: Buffer
  identity: Identity
  serial: string
  validTo: Date
}

function readPem(file: string, what: string): Buffer {
  try {
    return readFileSync(file)
  } catch (error) {
    const code = (error as { code?: unknown }).code
    const reason = code === 'ENOENT' ? 'no such file' : errorMessage(error)
    throw new DuplexError('INVALID_ARGUMENT', `cannot read the TLS ${what} ${file}: ${reason}`)
  }
}

const pemCertificate = /-----BEGIN CERTIFICATE-----[\s\S]+?-----END CERTIFICATE-----/g

function parseCertificates(pem: Buffer, file: string, what: string): X509Certificate[] {
  const blocks = pem.toString('latin1').match(pemCertificate) ?? []
  if (blocks.length === 0) {
    throw new DuplexError('INVALID_ARGUMENT', `the TLS ${what} ${file} holds no PEM certificate`)
  }
  return blocks.map((block) => {
    try {
      return new X509Certificate(block)
    } catch (error) {
      throw new DuplexError(
        'INVALID_ARGUMENT',
        `the TLS ${what} ${file} holds a malformed certificate: ${errorMessage(error)}`,
      )
    }
  })
}

function day(date: Date): string {
  return date
    .toISOString()
    .replace('T', ' ')
    .replace(/\.\d+Z$/, ' UTC')
}

/**
 * Reads `files` and checks them: the key belongs to the certificate, the certificate is valid
 * `now`, one of the CA certificates (if any) issued it, and it meets `expect` (if given). Throws
 * INVALID_ARGUMENT with the reason.
 */
export function loadTlsFiles(
  files: TlsFiles,
  expect: Expectation | undefined,
  now: Date,
): TlsMaterial {
  const ca = files.ca === undefined ? undefined : readPem(files.ca, 'CA bundle')
  const cert = readPem(files.cert, 'certificate')
  const key = readPem(files.key, 'key')
  const authorities =
    ca === undefined || files.ca === undefined ? [] : parseCertificates(ca, files.ca, 'CA bundle')
  for (const authority of authorities) {
    if (!authority.ca) {
      throw new DuplexError(
        'INVALID_ARGUMENT',
        `the TLS CA bundle ${files.ca ?? ''} holds ${authority.subject.replaceAll('\n', ', ')}, which is not a CA certificate`,
      )
    }
  }
  const [leaf] = parseCertificates(cert, files.cert, 'certificate')
  if (leaf === undefined) throw new DuplexError('INVALID_ARGUMENT', `${files.cert}: empty`)
  const identity = identityOfCertificate(leaf)
  const who = `${files.cert} (${describeIdentity(identity)})`
  let privateKey
  try {
    privateKey = createPrivateKey(key)
  } catch (error) {
    throw new DuplexError(
      'INVALID_ARGUMENT',
      `the TLS key ${files.key} is not a PEM private key: ${errorMessage(error)}`,
    )
  }
  if (!leaf.checkPrivateKey(privateKey)) {
    throw new DuplexError(
      'INVALID_ARGUMENT',
      `the TLS key ${files.key} does not belong to the certificate ${files.cert}`,
    )
  }
  const validFrom = new Date(leaf.validFrom)
  const validTo = new Date(leaf.validTo)
  if (validFrom.getTime() > now.getTime()) {
    throw new DuplexError(
      'INVALID_ARGUMENT',
      `the TLS certificate ${who} is not valid before ${day(validFrom)} (is this machine's clock right?)`,
    )
  }
  if (validTo.getTime() <= now.getTime()) {
    throw new DuplexError(
      'INVALID_ARGUMENT',
      `the TLS certificate ${who} expired on ${day(validTo)}: issue a new one (duplex cert issue) and replace the files`,
    )
  }
  const issued = authorities.some(
    (authority) => leaf.checkIssued(authority) && leaf.verify(authority.publicKey),
  )
  if (authorities.length > 0 && !issued) {
    throw new DuplexError(
      'INVALID_ARGUMENT',
      `the TLS certificate ${who} was issued by ${leaf.issuer.replaceAll('\n', ', ')}, not by a CA in ${files.ca ?? ''}`,
    )
  }
  const problem = expect === undefined ? undefined : identityProblem(identity, expect)
  if (problem !== undefined) {
    throw new DuplexError(
      'INVALID_ARGUMENT',
      `the TLS certificate ${files.cert}: ${problem} (duplex cert issue NAME --kind ${expect?.role ?? ''})`,
    )
  }
  return {
    ca,
    cert,
    key,
    identity: identity ?? { name: '', role: undefined },
    serial: leaf.serialNumber,
    validTo,
  }
}

// ---------------------------------------------------------------------------------------------
// Keeping them current

type CaListener = grpc.experimental.CaCertificateUpdateListener
type IdentityListener = grpc.experimental.IdentityCertificateUpdateListener

export interface TlsCredentialsOptions {
  files: TlsFiles
  /** What this process's own certificate must be, if anything. */
  self?: Expectation | undefined
  log: Logger
  /** How often the files are checked for changes; 0: only when `reload` is called. */
  reloadMs?: number
  /** Called after a new set was installed (metrics). */
  onInstalled?: (material: TlsMaterial) => void
  /** Milliseconds since the epoch (tests move it); Date.now by default. */
  clock?: () => number
}

/** Default `reloadMs`: a replaced certificate is in use within a minute. */
const tlsReloadMsDefault = 60_000

export class TlsCredentials implements grpc.experimental.CertificateProvider {
  private material: TlsMaterial
  private context: tls.SecureContext
  private stamp: string
  private lastProblem: string | undefined
  /** The serial whose expiry was logged. */
  private expiredSaid: string | undefined
  private readonly now: () => number
  private readonly caListeners = new Set<CaListener>()
  private readonly identityListeners = new Set<IdentityListener>()
  private readonly timer: NodeJS.Timeout | undefined

  /** Throws INVALID_ARGUMENT (see loadTlsFiles) when the files are not usable now. */
  constructor(private readonly options: TlsCredentialsOptions) {
    this.now = options.clock ?? Date.now
    this.stamp = this.fileStamp()
    this.material = loadTlsFiles(options.files, options.self, new Date(this.now()))
    this.context = secureContextOf(this.material)
    const reloadMs = options.reloadMs ?? tlsReloadMsDefault
    if (reloadMs > 0) {
      this.timer = setInterval(() => this.reload(), reloadMs)
      this.timer.unref()
    }
    options.onInstalled?.(this.material)
  }

  get current(): TlsMaterial {
    return this.material
  }

  get identity(): Identity {
    return this.material.identity
  }

  /** For NBD's STARTTLS: the newest certificate, with client verification against the CA. */
  secureContext(): tls.SecureContext {
    return this.context
  }

  /**
   * Re-reads the files if they changed (`force`: regardless). Installs them if they pass the
   * checks; otherwise logs why (once per distinct problem) and keeps the current set.
   * Returns whether a new set was installed.
   */
  reload(force = false): boolean {
    const { files, self, log } = this.options
    const stamp = this.fileStamp()
    if (!force && stamp === this.stamp) {
      this.checkExpiry()
      return false
    }
    let material: TlsMaterial
    let context: tls.SecureContext
    try {
      material = loadTlsFiles(files, self, new Date(this.now()))
      context = secureContextOf(material)
    } catch (error) {
      const problem = errorMessage(error)
      if (problem !== this.lastProblem) {
        log.error('the new TLS files are not usable; keeping the current certificate', {
          problem,
          serial: this.material.serial,
        })
      }
      this.lastProblem = problem
      return false
    }
    this.stamp = stamp
    this.lastProblem = undefined
    const sameCa =
      material.ca === undefined || this.material.ca === undefined
        ? material.ca === this.material.ca
        : material.ca.equals(this.material.ca)
    const changed = material.serial !== this.material.serial || !sameCa
    this.material = material
    this.context = context
    if (changed) {
      log.info('installed a new TLS certificate', {
        name: material.identity.name,
        serial: material.serial,
        validTo: material.validTo.toISOString(),
      })
    }
    if (material.ca !== undefined) {
      for (const listener of this.caListeners) listener({ caCertificate: material.ca })
    }
    for (const listener of this.identityListeners) {
      listener({ certificate: material.cert, privateKey: material.key })
    }
    this.options.onInstalled?.(material)
    return true
  }

  /** Says once, loudly, when the certificate in use has expired and was not replaced. */
  private checkExpiry(): void {
    const { validTo, identity, serial } = this.material
    if (this.expiredSaid === serial || validTo.getTime() > this.now()) return
    this.expiredSaid = serial
    this.options.log.error(
      'the TLS certificate in use has expired: other processes refuse this one; install a new one (docs/security.md)',
      { name: identity.name, serial, validTo: validTo.toISOString() },
    )
  }

  /** A gRPC server that requires a client certificate from the CA. */
  serverCredentials(): grpc.ServerCredentials {
    this.assertCa()
    return grpc.experimental.createCertificateProviderServerCredentials(this, this, true)
  }

  /**
   * A gRPC channel to a server whose certificate must meet `server` (create the channel with
   * `clusterChannelOptions`).
   */
  channelCredentials(server: Expectation): grpc.ChannelCredentials {
    this.assertCa()
    return grpc.experimental.createCertificateProviderChannelCredentials(this, this, {
      checkServerIdentity: (_host, cert) => serverIdentityError(cert, server),
    })
  }

  private assertCa(): void {
    assert(this.options.files.ca !== undefined, 'cluster TLS needs a CA')
  }

  close(): void {
    if (this.timer !== undefined) clearInterval(this.timer)
  }

  addCaCertificateListener(listener: CaListener): void {
    this.caListeners.add(listener)
    if (this.material.ca !== undefined) {
      process.nextTick(listener, { caCertificate: this.material.ca })
    }
  }

  removeCaCertificateListener(listener: CaListener): void {
    this.caListeners.delete(listener)
  }

  addIdentityCertificateListener(listener: IdentityListener): void {
    this.identityListeners.add(listener)
    const { cert, key } = this.material
    process.nextTick(listener, { certificate: cert, privateKey: key })
  }

  removeIdentityCertificateListener(listener: IdentityListener): void {
    this.identityListeners.delete(listener)
  }

  private fileStamp(): string {
    const { ca, cert, key } = this.options.files
    return [ca ?? '', cert, key]
      .map((file) => {
        try {
          const stat = statSync(file)
          return `${stat.ino}:${stat.size}:${stat.mtimeMs}`
        } catch {
          return 'missing'
        }
      })
      .join('/')
  }
}

function secureContextOf(material: TlsMaterial): tls.SecureContext {
  try {
    const { ca, cert, key } = material
    return tls.createSecureContext({ cert, key, ...(ca === undefined ? {} : { ca }) })
  } catch (error) {
    throw new DuplexError('INVALID_ARGUMENT', `unusable TLS files: ${errorMessage(error)}`)
  }
}

/**
 * The check a client makes of a server: its certificate (already verified against the CA) must
 * carry the expected role, and name, when one is expected. The address dialled is not checked:
 * the name pins the exact peer, and stays right when an address changes. (NBD clients such as
 * QEMU do check the address, which is why node certificates name it.)
 */
function serverIdentityError(cert: PeerCertificate, expect: Expectation): Error | undefined {
  const problem = identityProblem(identityOfSubject(cert.subject), expect)
  if (problem === undefined) return undefined
  return new Error(`not the expected ${roleUnit(expect.role)}: ${problem}`)
}

/**
 * Channel options for a client using `channelCredentials`: the TLS server name (SNI) it sends.
 * Without it grpc-js sends the dialled IP address, which RFC 6066 forbids and Node warns about.
 */
export const clusterChannelOptions = { 'grpc.ssl_target_name_override': 'duplex' } as const
