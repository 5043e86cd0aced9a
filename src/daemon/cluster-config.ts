/**
 * The cluster file: which nodes exist, where they listen for replication, and which two nodes
 * hold each volume. A stand-in for the witness catalog, so the boundary is deliberately small:
 * `readClusterConfig` reads and validates once, the rest of the daemon gets a plain, checked
 * `ClusterConfig` and never sees the JSON.
 *
 *   {
 *     "witness": "127.0.0.1:10900",
 *     "nodes": [
 *       { "name": "node-a", "domain": "site-a", "replication": "127.0.0.1:10810" },
 *       { "name": "node-b", "domain": "site-b", "replication": "127.0.0.1:10820" }
 *     ],
 *     "volumes": [
 *       { "name": "demo", "size": "1G", "replicas": ["node-a", "node-b"], "primary": "node-a",
 *         "followTheWriter": false, "onLostQuorum": "error" }
 *     ]
 *   }
 *
 * - `witness` (optional): HOST:PORT of the witness (third site). Without one, a replica that
 *   loses its peer waits for it (nothing is acknowledged alone, and nothing fails over).
 * - `nodes` (at least one): `name` and `domain` follow the volume name rule (1-64 characters of
 *   a-z, 0-9, '.', '_', '-', starting with a letter or digit); names are unique. `replication` is
 *   the HOST:PORT the peers connect to: IPv4, hostname or [IPv6], port 1-65535, not a wildcard
 *   address, and not shared with another node.
 * - `volumes` (may be empty): `name` valid and unique; `size` as "1G"/"512MiB" or a number of
 *   bytes, a valid volume size; `replicas` exactly two distinct known nodes in different failure
 *   domains; `primary` one of them; `followTheWriter` optional: false (default), true, or
 *   `{ "windowSeconds", "holdSeconds", "shareMin", "bytesMin" }` to tune the policy;
 *   `resyncRate` optional: bytes per second a sync or resync may copy, like "100M"
 *   (default: no limit); `onLostQuorum` optional: what I/O does while this node's replica may not serve (its peer and
 *   the witness are out of reach): "error" (default: fail with EIO so the hypervisor's HA can
 *   act) or "suspend" (hold requests until service is possible again).
 * - Unknown keys anywhere are errors: a typo must not silently fall back to a default.
 *
 * Every problem is an INVALID_ARGUMENT whose message starts with the file and the JSON path of
 * the first problem found (nodes before volumes, in file order), e.g.
 * `cluster.json: volumes[0].replicas: node-a and node-c are both in domain site-a; ...`.
 */
import { BlockList, isIP } from 'node:net'
import { readFile } from 'node:fs/promises'
import { assert } from '../core/assert.js'
import { DuplexError, errorMessage, isDuplexError } from '../core/errors.js'
import { parseSize } from '../core/units.js'
import { parseEndpoint } from '../core/endpoints.js'
import type { FollowTheWriterOptions } from '../replica/follow-the-writer.js'
import { validateVolumeName, validateVolumeSize, volumeNameBytesMax } from '../replica/store.js'

export interface ClusterNode {
  name: string
  domain: string
  replication: { host: string; port: number }
}

export interface ClusterVolume {
  name: string
  sizeBytes: number
  replicas: [string, string]
  primary: string
  /** false: the primary stays put; otherwise the policy's settings (see follow-the-writer.ts). */
  followTheWriter: false | FollowTheWriterOptions
  onLostQuorum: OnLostQuorum
  /** Bytes per second a sync or resync of this volume may copy (0: unlimited). */
  resyncRateBytes: number
  /** A replica move under way (catalog only): `from`'s replica is copied to `to` (move.ts). */
  move?: { from: string; to: string } | undefined
  /**
   * Who may open the volume over NBD: certificate common names (TLS clients) and addresses or
   * CIDR blocks. An empty list does not restrict; both lists must let a client in.
   */
  access?: { clients: string[]; addresses: string[] } | undefined
}

/** DRBD's on-no-quorum: fail I/O (io-error) or hold it (suspend-io). */
export type OnLostQuorum = 'error' | 'suspend'

export interface ClusterConfig {
  /** The witness's HOST:PORT; undefined: no witness (no failover). */
  witness: { host: string; port: number } | undefined
  nodes: ClusterNode[]
  volumes: ClusterVolume[]
}

const topKeys = ['witness', 'nodes', 'volumes']
const nodeKeys = ['name', 'domain', 'replication']
const volumeKeys = [
  'name',
  'size',
  'replicas',
  'primary',
  'followTheWriter',
  'onLostQuorum',
  'resyncRate',
  'move',
  'access',
]

/** The rule of `validateVolumeName`, for node and domain names. */
const namePattern = /^[a-z0-9][a-z0-9._-]*$/
const hostnameBytesMax = 253
const hostnameLabelPattern = /^[a-zA-Z0-9](?:[a-zA-Z0-9-]{0,61}[a-zA-Z0-9])?$/

/** An INVALID_ARGUMENT naming the file and the JSON path of the problem. */
class ConfigProblem {
  constructor(
    readonly source: string,
    readonly path: string,
  ) {}

  error(message: string): DuplexError {
    return new DuplexError('INVALID_ARGUMENT', `${this.source}: ${this.path}: ${message}`)
  }

  at(key: string | number): ConfigProblem {
    const path = typeof key === 'number' ? `${this.path}[${key}]` : `${this.path}.${key}`
    return new ConfigProblem(this.source, path)
  }
}

/**
 * Validates parsed JSON; throws DuplexError('INVALID_ARGUMENT', message) naming the file path and
 * the JSON path of the first problem.
 */
export function parseClusterConfig(json: unknown, source: string): ClusterConfig {
  if (!isRecord(json)) {
    throw new DuplexError('INVALID_ARGUMENT', `${source}: expected a JSON object at the top level`)
  }
  for (const key of Object.keys(json)) {
    if (!topKeys.includes(key)) throw unknownKey(new ConfigProblem(source, key), topKeys)
  }
  const witness =
    json['witness'] === undefined
      ? undefined
      : parseReplication(json['witness'], new ConfigProblem(source, 'witness'), 'witness endpoint')
  const nodesAt = new ConfigProblem(source, 'nodes')
  const nodesJson = requireArray(json['nodes'], nodesAt)
  if (nodesJson.length === 0) throw nodesAt.error('at least one node is needed')
  const nodes = parseNodes(nodesJson, nodesAt)
  const volumesAt = new ConfigProblem(source, 'volumes')
  const volumesJson = json['volumes'] === undefined ? [] : requireArray(json['volumes'], volumesAt)
  const volumes = parseVolumes(volumesJson, volumesAt, nodes)
  return { witness, nodes, volumes }
}

/** Reads and parses the file; a missing file and bad JSON are INVALID_ARGUMENT too. */
export async function readClusterConfig(path: string): Promise<ClusterConfig> {
  let text: string
  try {
    text = await readFile(path, 'utf8')
  } catch (error) {
    const message = isErrnoCode(error, 'ENOENT')
      ? `cluster file ${path} does not exist`
      : `cannot read cluster file ${path}: ${errorMessage(error)}`
    throw new DuplexError('INVALID_ARGUMENT', message, { cause: error })
  }
  let json: unknown
  try {
    json = JSON.parse(text)
  } catch (error) {
    throw new DuplexError('INVALID_ARGUMENT', `${path}: not valid JSON: ${errorMessage(error)}`, {
      cause: error,
    })
  }
  return parseClusterConfig(json, path)
}

/** The volumes that have a replica on `node`, with the peer's node record. */
export function volumesOfNode(
  config: ClusterConfig,
  node: string,
): { volume: ClusterVolume; peer: ClusterNode }[] {
  const result: { volume: ClusterVolume; peer: ClusterNode }[] = []
  for (const volume of config.volumes) {
    const [first, second] = volume.replicas
    if (first !== node && second !== node) continue
    const peer = findNode(config, first === node ? second : first)
    assert(peer !== undefined, `volume ${volume.name}: peer of ${node} is not a known node`)
    result.push({ volume, peer })
  }
  return result
}

export function findNode(config: ClusterConfig, name: string): ClusterNode | undefined {
  return config.nodes.find((node) => node.name === name)
}

function parseNodes(nodesJson: unknown[], at: ConfigProblem): ClusterNode[] {
  const nodes: ClusterNode[] = []
  const endpoints = new Map<string, string>()
  nodesJson.forEach((nodeJson, index) => {
    const nodeAt = at.at(index)
    const node = parseNode(nodeJson, nodeAt)
    if (nodes.some((other) => other.name === node.name)) {
      throw nodeAt.at('name').error(`node name ${node.name} is used twice`)
    }
    const endpointKey = `${node.replication.host.toLowerCase()} ${node.replication.port}`
    const owner = endpoints.get(endpointKey)
    if (owner !== undefined) {
      throw nodeAt
        .at('replication')
        .error(`node ${node.name} has the same replication endpoint as node ${owner}`)
    }
    endpoints.set(endpointKey, node.name)
    nodes.push(node)
  })
  return nodes
}

function parseNode(nodeJson: unknown, at: ConfigProblem): ClusterNode {
  const entry = requireRecord(nodeJson, at, nodeKeys)
  const name = requireName(entry['name'], at.at('name'), 'node name')
  const domain = requireName(entry['domain'], at.at('domain'), 'domain')
  const replication = parseReplication(entry['replication'], at.at('replication'))
  return { name, domain, replication }
}

function parseReplication(
  value: unknown,
  at: ConfigProblem,
  what = 'replication endpoint',
): { host: string; port: number } {
  const text = requireString(value, at)
  return rethrowAt(at, () => parseReachableEndpoint(text, what))
}

/**
 * HOST:PORT that other machines connect to: IPv4, hostname or [IPv6], port 1-65535, not a
 * wildcard address. INVALID_ARGUMENT with the expected form otherwise.
 */
export function parseReachableEndpoint(text: string, what: string): { host: string; port: number } {
  const { host, port } = parseEndpoint(text, what)
  const bracketed = text.trim().startsWith('[')
  if (bracketed ? isIP(host) !== 6 : !isIPv4OrHostname(host)) {
    throw new DuplexError(
      'INVALID_ARGUMENT',
      `${what} "${text}" has no valid host: use an IPv4 address, ` +
        `a hostname or [IPv6], e.g. 10.0.0.1:10810 or [fd00::1]:10810`,
    )
  }
  if (host === '0.0.0.0' || (isIP(host) === 6 && /^[0:]+$/.test(host))) {
    throw new DuplexError(
      'INVALID_ARGUMENT',
      `${what} "${text}" is a wildcard address; peers cannot reach it`,
    )
  }
  if (port < 1) throw new DuplexError('INVALID_ARGUMENT', `${what} "${text}": port must be 1-65535`)
  return { host, port }
}

function isIPv4OrHostname(host: string): boolean {
  if (/^[\d.]+$/.test(host)) return isIP(host) === 4
  return (
    host.length <= hostnameBytesMax &&
    host.split('.').every((label) => hostnameLabelPattern.test(label))
  )
}

function parseVolumes(
  volumesJson: unknown[],
  at: ConfigProblem,
  nodes: ClusterNode[],
): ClusterVolume[] {
  const volumes: ClusterVolume[] = []
  volumesJson.forEach((volumeJson, index) => {
    const volumeAt = at.at(index)
    const volume = parseVolume(volumeJson, volumeAt, nodes)
    if (volumes.some((other) => other.name === volume.name)) {
      throw volumeAt.at('name').error(`volume name ${volume.name} is used twice`)
    }
    volumes.push(volume)
  })
  return volumes
}

const followKeys = ['windowSeconds', 'holdSeconds', 'shareMin', 'bytesMin']

/** `false` (default), `true` (the policy's defaults) or an object of tuning knobs. */
function parseFollowTheWriter(value: unknown, at: ConfigProblem): false | FollowTheWriterOptions {
  if (value === undefined || value === false) return false
  if (value === true) return {}
  if (typeof value !== 'object' || value === null || Array.isArray(value)) {
    throw at.error(`expected true, false or an object of settings, got ${describe(value)}`)
  }
  const entry = requireRecord(value, at, followKeys)
  const options: FollowTheWriterOptions = {}
  const seconds = (key: string): number | undefined => {
    const raw = entry[key]
    if (raw === undefined) return undefined
    if (typeof raw !== 'number' || !Number.isFinite(raw) || raw <= 0) {
      throw at.at(key).error(`expected a number of seconds greater than 0, got ${describe(raw)}`)
    }
    return raw * 1000
  }
  const windowMs = seconds('windowSeconds')
  if (windowMs !== undefined) options.windowMs = windowMs
  const holdMs = seconds('holdSeconds')
  if (holdMs !== undefined) options.holdMs = holdMs
  const shareMin = entry['shareMin']
  if (shareMin !== undefined) {
    if (typeof shareMin !== 'number' || !(shareMin > 0.5 && shareMin <= 1)) {
      throw at
        .at('shareMin')
        .error(`expected a fraction above 0.5 and at most 1, got ${describe(shareMin)}`)
    }
    options.shareMin = shareMin
  }
  if (entry['bytesMin'] !== undefined) {
    const bytesAt = at.at('bytesMin')
    const raw = entry['bytesMin']
    const bytes = rethrowAt(bytesAt, () =>
      typeof raw === 'string' ? parseSize(raw) : typeof raw === 'number' ? raw : Number.NaN,
    )
    if (!Number.isSafeInteger(bytes) || bytes <= 0) {
      throw bytesAt.error(
        `expected a size such as "64M" or a number of bytes, got ${describe(raw)}`,
      )
    }
    options.bytesMin = bytes
  }
  return options
}

function parseVolume(volumeJson: unknown, at: ConfigProblem, nodes: ClusterNode[]): ClusterVolume {
  const entry = requireRecord(volumeJson, at, volumeKeys)
  const name = requireString(entry['name'], at.at('name'))
  rethrowAt(at.at('name'), () => {
    validateVolumeName(name)
  })
  const sizeBytes = parseVolumeSize(entry['size'], at.at('size'))
  const replicas = parseReplicas(entry['replicas'], at.at('replicas'), nodes)
  const primaryAt = at.at('primary')
  const primary = requireString(entry['primary'], primaryAt)
  if (!replicas.includes(primary)) {
    throw primaryAt.error(
      `primary ${JSON.stringify(primary)} is not one of the replicas ${replicas.join(' and ')}`,
    )
  }
  const followTheWriter = parseFollowTheWriter(entry['followTheWriter'], at.at('followTheWriter'))
  const onLostQuorum = parseOnLostQuorum(entry['onLostQuorum'], at.at('onLostQuorum'))
  const resyncRateBytes = parseRate(entry['resyncRate'], at.at('resyncRate'))
  const move = parseMove(entry['move'], at.at('move'), replicas, nodes)
  const access = parseAccess(entry['access'], at.at('access'))
  return {
    name,
    sizeBytes,
    replicas,
    primary,
    followTheWriter,
    onLostQuorum,
    resyncRateBytes,
    ...(move === undefined ? {} : { move }),
    ...(access === undefined ? {} : { access }),
  }
}

/** `{"clients": [CN...], "addresses": [IP or CIDR...]}`, both optional. */
function parseAccess(
  value: unknown,
  at: ConfigProblem,
): { clients: string[]; addresses: string[] } | undefined {
  if (value === undefined) return undefined
  const entry = requireRecord(value, at, ['clients', 'addresses'])
  const list = (key: string): string[] => {
    const raw = entry[key]
    if (raw === undefined) return []
    if (!Array.isArray(raw) || !raw.every((item) => typeof item === 'string' && item !== '')) {
      throw at.at(key).error(`expected a list of non-empty strings, got ${describe(raw)}`)
    }
    return raw as string[]
  }
  const addresses = list('addresses')
  for (const address of addresses) {
    const problem = addressPatternProblem(address)
    if (problem !== undefined) throw at.at('addresses').error(problem)
  }
  return { clients: list('clients'), addresses }
}

/** Why `pattern` is not an IP address or a CIDR block (undefined: it is one). */
export function addressPatternProblem(pattern: string): string | undefined {
  const [address = '', bits, extra] = pattern.split('/')
  const family = isIP(address)
  if (family === 0 || extra !== undefined)
    return `${JSON.stringify(pattern)} is not an IP address or a CIDR block`
  if (bits === undefined) return undefined
  const prefix = Number(bits)
  if (!/^\d+$/.test(bits) || prefix > (family === 4 ? 32 : 128)) {
    return `${JSON.stringify(pattern)} has a bad prefix length`
  }
  return undefined
}

/**
 * Why `client` may not open `volume` by its access list (undefined: it may). A client must match
 * both lists that are not empty; one without a verified certificate matches no client name.
 */
export function accessRefusal(
  volume: ClusterVolume,
  client: { address: string; certificateName: string | undefined },
): string | undefined {
  const access = volume.access
  if (access === undefined) return undefined
  if (access.clients.length > 0) {
    const name = client.certificateName
    if (name === undefined) {
      return `volume ${volume.name} is open only to TLS clients with a certificate it names`
    }
    if (!access.clients.includes(name)) {
      return `the certificate ${JSON.stringify(name)} may not open volume ${volume.name}`
    }
  }
  if (access.addresses.length > 0 && !addressAllowed(access.addresses, client.address)) {
    return `address ${client.address} may not open volume ${volume.name}`
  }
  return undefined
}

function addressAllowed(patterns: readonly string[], address: string): boolean {
  const plain =
    address.startsWith('::ffff:') && isIP(address.slice(7)) === 4 ? address.slice(7) : address
  const family = isIP(plain)
  if (family === 0) return false
  const list = new BlockList()
  for (const pattern of patterns) {
    const [base = '', bits] = pattern.split('/')
    const type = isIP(base) === 4 ? 'ipv4' : 'ipv6'
    if (bits === undefined) list.addAddress(base, type)
    else list.addSubnet(base, Number(bits), type)
  }
  return list.check(plain, family === 4 ? 'ipv4' : 'ipv6')
}

/** `{"from": NODE, "to": NODE}`: `from` holds a replica, `to` is another known node. */
function parseMove(
  value: unknown,
  at: ConfigProblem,
  replicas: [string, string],
  nodes: ClusterNode[],
): { from: string; to: string } | undefined {
  if (value === undefined) return undefined
  const entry = requireRecord(value, at, ['from', 'to'])
  const from = requireString(entry['from'], at.at('from'))
  const to = requireString(entry['to'], at.at('to'))
  if (!replicas.includes(from)) {
    throw at.at('from').error(`${from} holds no replica (${replicas.join(' and ')} do)`)
  }
  if (replicas.includes(to) || !nodes.some((node) => node.name === to)) {
    throw at.at('to').error(`${to} must be a known node that holds no replica yet`)
  }
  return { from, to }
}

/** Volumes being moved to `node` (it receives a copy; it is not a replica yet). */
export function volumesMovingTo(config: ClusterConfig, node: string): ClusterVolume[] {
  return config.volumes.filter((volume) => volume.move?.to === node)
}

/** A rate like "100M" (bytes per second, size suffixes) or a number; absent: unlimited (0). */
function parseRate(value: unknown, at: ConfigProblem): number {
  if (value === undefined) return 0
  if (typeof value !== 'string' && typeof value !== 'number') {
    throw at.error(`expected bytes per second like "100M", got ${describe(value)}`)
  }
  const bytes = rethrowAt(at, () => (typeof value === 'string' ? parseSize(value) : value))
  if (!Number.isSafeInteger(bytes) || bytes < 1024 * 1024) {
    throw at.error(`${String(value)} is below 1 MiB per second; leave it out for no limit`)
  }
  return bytes
}

function parseOnLostQuorum(value: unknown, at: ConfigProblem): OnLostQuorum {
  if (value === undefined) return 'error'
  if (value === 'error' || value === 'suspend') return value
  throw at.error(`expected "error" or "suspend", got ${describe(value)}`)
}

function parseVolumeSize(value: unknown, at: ConfigProblem): number {
  if (value === undefined) throw at.error('missing')
  if (typeof value !== 'string' && typeof value !== 'number') {
    throw at.error(`expected a size like "1G" or a number of bytes, got ${describe(value)}`)
  }
  return rethrowAt(at, () => {
    const sizeBytes = typeof value === 'string' ? parseSize(value) : value
    validateVolumeSize(sizeBytes)
    return sizeBytes
  })
}

function parseReplicas(value: unknown, at: ConfigProblem, nodes: ClusterNode[]): [string, string] {
  const list = requireArray(value, at)
  if (list.length !== 2) throw at.error(`expected exactly two node names, got ${list.length}`)
  const [first, second] = list.map((item, index) => requireString(item, at.at(index)))
  assert(first !== undefined && second !== undefined)
  if (first === second) throw at.error(`${first} is named twice; the two replicas must differ`)
  const firstNode = requireNode(nodes, first, at.at(0))
  const secondNode = requireNode(nodes, second, at.at(1))
  if (firstNode.domain === secondNode.domain) {
    throw at.error(
      `${first} and ${second} are both in domain ${firstNode.domain}; ` +
        `the two replicas must be in different domains`,
    )
  }
  return [first, second]
}

function requireNode(nodes: ClusterNode[], name: string, at: ConfigProblem): ClusterNode {
  const node = nodes.find((candidate) => candidate.name === name)
  if (node === undefined) throw at.error(`${JSON.stringify(name)} is not a node in "nodes"`)
  return node
}

function requireName(value: unknown, at: ConfigProblem, what: string): string {
  const name = requireString(value, at)
  if (name.length > volumeNameBytesMax || !namePattern.test(name)) {
    throw at.error(
      `${what} ${JSON.stringify(name)} is not valid: use 1-${volumeNameBytesMax} characters ` +
        `from a-z, 0-9, '.', '_' and '-', starting with a letter or a digit`,
    )
  }
  return name
}

function requireString(value: unknown, at: ConfigProblem): string {
  if (value === undefined) throw at.error('missing')
  if (typeof value !== 'string') throw at.error(`expected a string, got ${describe(value)}`)
  return value
}

function requireArray(value: unknown, at: ConfigProblem): unknown[] {
  if (value === undefined) throw at.error('missing')
  if (!Array.isArray(value)) throw at.error(`expected a list, got ${describe(value)}`)
  return value
}

function requireRecord(
  value: unknown,
  at: ConfigProblem,
  allowedKeys: string[],
): Record<string, unknown> {
  if (!isRecord(value)) throw at.error(`expected an object, got ${describe(value)}`)
  for (const key of Object.keys(value)) {
    if (!allowedKeys.includes(key)) throw unknownKey(at.at(key), allowedKeys)
  }
  return value
}

function unknownKey(at: ConfigProblem, allowedKeys: string[]): DuplexError {
  return at.error(`unknown key; expected one of ${allowedKeys.join(', ')}`)
}

/** Runs a validator that throws INVALID_ARGUMENT and puts the file and JSON path in front. */
function rethrowAt<T>(at: ConfigProblem, validate: () => T): T {
  try {
    return validate()
  } catch (error) {
    if (isDuplexError(error, 'INVALID_ARGUMENT')) throw at.error(error.message)
    throw error
  }
}

function isRecord(value: unknown): value is Record<string, unknown> {
  return typeof value === 'object' && value !== null && !Array.isArray(value)
}

function describe(value: unknown): string {
  if (value === null || value === undefined) return String(value)
  if (Array.isArray(value)) return 'a list'
  if (typeof value === 'object') return 'an object'
  return `${typeof value} ${JSON.stringify(value)}`
}

function isErrnoCode(error: unknown, code: string): boolean {
  return error instanceof Error && (error as NodeJS.ErrnoException).code === code
}
