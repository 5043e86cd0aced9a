/**
 * Placement, pure: from the cluster view (domains, nodes, their capacity and state, the volumes
 * placed so far) and a request, a plan, or a refusal whose reason an admin can act on. No I/O,
 * no clock, no randomness: the same view and request always give the same plan, whatever order
 * the view lists things in. ARCHITECTURE.md "Placement and catalog".
 *
 * Rules:
 * - A volume's two replicas sit on nodes of two different `data` domains (the sites), never both
 *   in one; the cluster must have a `witness` domain, which by its kind is neither of them.
 * - Capacity: a replica reserves the volume's full size on its node; a node never holds more
 *   than its capacity. Only `active` nodes receive new replicas.
 * - Balance: in a domain, the node with the most free bytes is chosen (ties: by name). Among
 *   data domains, the preferred one (where the primary should run) first, then the domain whose
 *   best node has the most free bytes (ties: by name).
 * - `move` rebuilds one replica on another node of the same domain (so the sites stay apart);
 *   `drain` plans a move for every replica on a node, each counting the space the ones before
 *   took; `resize` needs the growth free on both replicas' nodes.
 */
import { formatSize } from '../core/units.js'

export type DomainKind = 'data' | 'witness'

export interface DomainView {
  name: string
  kind: DomainKind
}

/** `active`: receives replicas; `draining`: keeps its replicas until moved, receives none; `down`. */
export type NodeState = 'active' | 'draining' | 'down'

export interface NodeView {
  name: string
  domain: string
  capacityBytes: number
  state: NodeState
}

export interface VolumeView {
  name: string
  sizeBytes: number
  /** The nodes holding its two replicas. */
  replicas: readonly [string, string]
  /** A node a replica is being moved to (its space is taken already). */
  incoming?: string | undefined
}

export interface ClusterView {
  domains: readonly DomainView[]
  nodes: readonly NodeView[]
  volumes: readonly VolumeView[]
}

export type PlacementRequest =
  | { type: 'create'; volume: string; sizeBytes: number; preferredDomain?: string | undefined }
  | { type: 'move'; volume: string; fromNode: string; toNode?: string | undefined }
  | { type: 'drain'; node: string }
  | { type: 'resize'; volume: string; sizeBytes: number }

export interface ReplicaMove {
  volume: string
  fromNode: string
  toNode: string
}

export type Plan =
  | {
      type: 'create'
      volume: string
      /** The first replica's node is in the preferred domain (where the primary starts). */
      replicas: readonly [string, string]
      witnessDomain: string
    }
  | { type: 'moves'; moves: ReplicaMove[] }
  | { type: 'resize'; volume: string; sizeBytes: number }

export type PlacementResult = { ok: true; plan: Plan } | { ok: false; reason: string }

/** Bytes reserved on each node by the volumes placed (every node of the view, 0 if none). */
export function usedBytes(view: ClusterView): Map<string, number> {
  const used = new Map(view.nodes.map((node) => [node.name, 0]))
  for (const volume of view.volumes) {
    for (const node of volume.replicas) used.set(node, (used.get(node) ?? 0) + volume.sizeBytes)
    if (volume.incoming !== undefined) {
      used.set(volume.incoming, (used.get(volume.incoming) ?? 0) + volume.sizeBytes)
    }
  }
  return used
}

export function place(view: ClusterView, request: PlacementRequest): PlacementResult {
  switch (request.type) {
    case 'create':
      return create(view, request)
    case 'move':
      return move(view, request)
    case 'drain':
      return drain(view, request.node)
    case 'resize':
      return resize(view, request)
  }
}

function refuse(reason: string): PlacementResult {
  return { ok: false, reason }
}

function create(
  view: ClusterView,
  request: Extract<PlacementRequest, { type: 'create' }>,
): PlacementResult {
  const { volume, sizeBytes } = request
  if (!Number.isSafeInteger(sizeBytes) || sizeBytes <= 0) {
    return refuse(`volume size must be a positive number of bytes, not ${sizeBytes}`)
  }
  if (view.volumes.some((existing) => existing.name === volume)) {
    return refuse(`a volume named ${volume} exists already`)
  }
  const witness = sortedByName(view.domains.filter((domain) => domain.kind === 'witness'))[0]
  if (witness === undefined) {
    return refuse(
      'the cluster has no witness domain; add one in a third site: duplex domain add NAME --kind witness',
    )
  }
  const dataDomains = sortedByName(view.domains.filter((domain) => domain.kind === 'data'))
  if (dataDomains.length < 2) {
    return refuse(
      `a volume needs two data domains (sites) and the cluster has ${dataDomains.length}` +
        `${dataDomains.length === 1 ? ` (${dataDomains[0]?.name ?? ''})` : ''}; add one: duplex domain add NAME --kind data`,
    )
  }
  const preferred = request.preferredDomain
  if (preferred !== undefined && !dataDomains.some((domain) => domain.name === preferred)) {
    const known = view.domains.find((domain) => domain.name === preferred)
    return refuse(
      known === undefined
        ? `there is no domain ${preferred}; data domains: ${names(dataDomains)}`
        : `${preferred} is a ${known.kind} domain; a volume's replicas go to data domains: ${names(dataDomains)}`,
    )
  }
  const used = usedBytes(view)
  const best = dataDomains
    .map((domain) => ({ domain, node: bestNode(view, used, domain.name, sizeBytes, new Set()) }))
    .filter((candidate) => candidate.node !== undefined)
  if (best.length < 2) {
    return refuse(capacityReason(view, used, dataDomains, sizeBytes, best))
  }
  const free = (node: NodeView | undefined): number =>
    node === undefined ? 0 : node.capacityBytes - (used.get(node.name) ?? 0)
  best.sort((x, y) => {
    if (x.domain.name === preferred) return -1
    if (y.domain.name === preferred) return 1
    return free(y.node) - free(x.node) || compareNames(x.domain.name, y.domain.name)
  })
  const [first, second] = best
  if (first?.node === undefined || second?.node === undefined) {
    return refuse(capacityReason(view, used, dataDomains, sizeBytes, best))
  }
  if (preferred !== undefined && first.domain.name !== preferred) {
    return refuse(
      `no node of ${preferred} has ${formatSize(sizeBytes)} free; ${largestFree(view, used, preferred)}`,
    )
  }
  return {
    ok: true,
    plan: {
      type: 'create',
      volume,
      replicas: [first.node.name, second.node.name],
      witnessDomain: witness.name,
    },
  }
}

function move(
  view: ClusterView,
  request: Extract<PlacementRequest, { type: 'move' }>,
): PlacementResult {
  const volume = view.volumes.find((each) => each.name === request.volume)
  if (volume === undefined) return refuse(`there is no volume ${request.volume}`)
  if (!volume.replicas.includes(request.fromNode)) {
    return refuse(
      `${request.volume} has no replica on ${request.fromNode}; its replicas are on ${volume.replicas.join(' and ')}`,
    )
  }
  const from = view.nodes.find((node) => node.name === request.fromNode)
  if (from === undefined) return refuse(`there is no node ${request.fromNode}`)
  const used = usedBytes(view)
  const target = moveTarget(view, used, volume, from, request.toNode)
  if (typeof target === 'string') return refuse(target)
  return {
    ok: true,
    plan: {
      type: 'moves',
      moves: [{ volume: volume.name, fromNode: from.name, toNode: target.name }],
    },
  }
}

function drain(view: ClusterView, nodeName: string): PlacementResult {
  const node = view.nodes.find((each) => each.name === nodeName)
  if (node === undefined) return refuse(`there is no node ${nodeName}`)
  // The node receives nothing while it drains; the largest volumes first (they fit least).
  const drainingView: ClusterView = {
    ...view,
    nodes: view.nodes.map((each) =>
      each.name === nodeName ? { ...each, state: 'draining' as const } : each,
    ),
  }
  const volumes = view.volumes
    .filter((volume) => volume.replicas.includes(nodeName))
    .sort((x, y) => y.sizeBytes - x.sizeBytes || compareNames(x.name, y.name))
  // Greedy first (the most free node for each volume, in turn): balanced, and almost always
  // enough. If it gets stuck, a bounded exhaustive search looks for any plan that fits.
  const used = usedBytes(view)
  const moves: ReplicaMove[] = []
  for (const volume of volumes) {
    const target = moveTarget(drainingView, used, volume, node, undefined)
    if (typeof target === 'string') {
      const found = searchDrain(drainingView, node, volumes)
      if (found !== undefined) return { ok: true, plan: { type: 'moves', moves: found } }
      return refuse(
        `cannot drain ${nodeName}: ${target}` +
          (moves.length > 0
            ? ` (after moving ${moves.map((each) => each.volume).join(', ')})`
            : ''),
      )
    }
    used.set(target.name, (used.get(target.name) ?? 0) + volume.sizeBytes)
    moves.push({ volume: volume.name, fromNode: nodeName, toNode: target.name })
  }
  return { ok: true, plan: { type: 'moves', moves } }
}

/** Steps the exhaustive drain search may take before it gives up (it is exponential). */
const drainSearchStepsMax = 200_000

/** Any assignment of `volumes` to active nodes of `node`'s domain that fits, by backtracking. */
function searchDrain(
  view: ClusterView,
  node: NodeView,
  volumes: readonly VolumeView[],
): ReplicaMove[] | undefined {
  const used = usedBytes(view)
  const targets = sortedByName(
    view.nodes.filter((each) => each.domain === node.domain && each.state === 'active'),
  )
  const chosen: string[] = []
  let steps = 0
  const assign = (index: number): boolean => {
    const volume = volumes[index]
    if (volume === undefined) return true
    for (const target of targets) {
      if (++steps > drainSearchStepsMax) return false
      if (volume.replicas.includes(target.name)) continue
      const free = target.capacityBytes - (used.get(target.name) ?? 0)
      if (free < volume.sizeBytes) continue
      used.set(target.name, (used.get(target.name) ?? 0) + volume.sizeBytes)
      chosen.push(target.name)
      if (assign(index + 1)) return true
      chosen.pop()
      used.set(target.name, (used.get(target.name) ?? 0) - volume.sizeBytes)
    }
    return false
  }
  if (!assign(0)) return undefined
  return volumes.map((volume, index) => ({
    volume: volume.name,
    fromNode: node.name,
    toNode: chosen[index] ?? '',
  }))
}

function resize(
  view: ClusterView,
  request: Extract<PlacementRequest, { type: 'resize' }>,
): PlacementResult {
  const volume = view.volumes.find((each) => each.name === request.volume)
  if (volume === undefined) return refuse(`there is no volume ${request.volume}`)
  const { sizeBytes } = request
  if (!Number.isSafeInteger(sizeBytes) || sizeBytes <= 0) {
    return refuse(`volume size must be a positive number of bytes, not ${sizeBytes}`)
  }
  if (sizeBytes < volume.sizeBytes) {
    return refuse(
      `${volume.name} is ${formatSize(volume.sizeBytes)}; shrinking would cut off data the ` +
        `virtual machine may use, so volumes only grow`,
    )
  }
  const used = usedBytes(view)
  const growth = sizeBytes - volume.sizeBytes
  for (const name of volume.replicas) {
    const node = view.nodes.find((each) => each.name === name)
    const free = node === undefined ? 0 : node.capacityBytes - (used.get(name) ?? 0)
    if (free < growth) {
      return refuse(
        `${name} holds a replica of ${volume.name} and has ${formatSize(Math.max(0, free))} free; ` +
          `growing to ${formatSize(sizeBytes)} needs ${formatSize(growth)} more there (move the replica first: duplex volume move)`,
      )
    }
  }
  return { ok: true, plan: { type: 'resize', volume: volume.name, sizeBytes } }
}

/** Where one replica of `volume` on `from` can be rebuilt, or why nowhere. */
function moveTarget(
  view: ClusterView,
  used: Map<string, number>,
  volume: VolumeView,
  from: NodeView,
  toNode: string | undefined,
): NodeView | string {
  const exclude = new Set([...volume.replicas, ...(volume.incoming ? [volume.incoming] : [])])
  if (toNode !== undefined) {
    const to = view.nodes.find((node) => node.name === toNode)
    if (to === undefined) return `there is no node ${toNode}`
    if (to.domain !== from.domain) {
      return (
        `${toNode} is in ${to.domain}; a replica moves within its domain (${from.domain}) so that ` +
        `the two replicas of ${volume.name} stay in different sites`
      )
    }
    if (exclude.has(toNode)) return `${toNode} already holds a replica of ${volume.name}`
    if (to.state !== 'active') return `${toNode} is ${to.state} and receives no replicas`
    const free = to.capacityBytes - (used.get(toNode) ?? 0)
    if (free < volume.sizeBytes) {
      return `${toNode} has ${formatSize(Math.max(0, free))} free, ${volume.name} needs ${formatSize(volume.sizeBytes)}`
    }
    return to
  }
  const target = bestNode(view, used, from.domain, volume.sizeBytes, exclude)
  if (target !== undefined) return target
  return (
    `${volume.name} (${formatSize(volume.sizeBytes)}) fits on no other active node of ` +
    `${from.domain}; ${largestFree(view, used, from.domain, exclude)}. Add a node to ${from.domain}`
  )
}

/** The active node of `domain` with the most free bytes, at least `sizeBytes` (ties: by name). */
function bestNode(
  view: ClusterView,
  used: Map<string, number>,
  domain: string,
  sizeBytes: number,
  exclude: ReadonlySet<string>,
): NodeView | undefined {
  let best: NodeView | undefined
  let bestFree = -1
  for (const node of view.nodes) {
    if (node.domain !== domain || node.state !== 'active' || exclude.has(node.name)) continue
    const free = node.capacityBytes - (used.get(node.name) ?? 0)
    if (free < sizeBytes) continue
    if (free > bestFree || (free === bestFree && best !== undefined && node.name < best.name)) {
      best = node
      bestFree = free
    }
  }
  return best
}

function capacityReason(
  view: ClusterView,
  used: Map<string, number>,
  dataDomains: readonly DomainView[],
  sizeBytes: number,
  fitting: readonly { domain: DomainView }[],
): string {
  const size = formatSize(sizeBytes)
  if (fitting.length === 0) {
    const largest = dataDomains.map((domain) => largestFree(view, used, domain.name)).join('; ')
    return `no data domain has an active node with ${size} free (${largest})`
  }
  const only = fitting[0]?.domain.name ?? ''
  const others = dataDomains
    .filter((domain) => domain.name !== only)
    .map((domain) => largestFree(view, used, domain.name))
    .join('; ')
  return (
    `only one data domain has an active node with ${size} free (${only}); the replicas must be ` +
    `in two different sites (${others})`
  )
}

function largestFree(
  view: ClusterView,
  used: Map<string, number>,
  domain: string,
  exclude: ReadonlySet<string> = new Set(),
): string {
  const candidates = view.nodes.filter(
    (node) => node.domain === domain && node.state === 'active' && !exclude.has(node.name),
  )
  if (candidates.length === 0) {
    return `${domain} has no ${exclude.size > 0 ? 'other ' : ''}active node`
  }
  const best = candidates.reduce((x, y) => {
    const fx = x.capacityBytes - (used.get(x.name) ?? 0)
    const fy = y.capacityBytes - (used.get(y.name) ?? 0)
    return fy > fx || (fy === fx && y.name < x.name) ? y : x
  })
  const free = Math.max(0, best.capacityBytes - (used.get(best.name) ?? 0))
  return `the most free in ${domain} is ${formatSize(free)} on ${best.name}`
}

function sortedByName<T extends { name: string }>(items: readonly T[]): T[] {
  return [...items].sort((x, y) => compareNames(x.name, y.name))
}

function compareNames(x: string, y: string): number {
  return x < y ? -1 : x > y ? 1 : 0
}

function names(domains: readonly DomainView[]): string {
  return domains.map((domain) => domain.name).join(', ') || 'none'
}
