// What the server pushes (crates/ui/src/aggregate.rs and session.rs) and
// how a page's query is written in URLs.

export interface Verdicts {
  forwarded: number;
  dropped: number;
  audit: number;
  error: number;
}

export interface MapNode {
  id: string;
  label: string;
  kind: string;
  namespace: string;
  identity: number;
  labels: string[];
}

export interface MapEdge {
  id: string;
  source: string;
  target: string;
  port: number;
  protocol: string;
  counts: Verdicts;
  verdict: "forwarded" | "dropped" | "audit" | "error" | "mixed";
  http_methods: Record<string, number>;
  http_status: Record<string, number>;
  http_paths: string[];
  dns_names: string[];
  latency_ms: [number, number] | null;
  allowed_by: string[];
  denied_by: string[];
  default_deny_by: string[] | null;
}

export interface ProtocolRow {
  l4: string;
  l7: string;
  counts: Verdicts;
  rate: number;
}

export interface Snapshot {
  window_s: number;
  seen: number;
  rate: number;
  nodes: MapNode[];
  edges: MapEdge[];
  protocols: ProtocolRow[];
}

// `hubble observe -o json`'s line: the flow in Hubble's JSON form.
export interface FlowLine {
  flow: Flow;
  node_name: string;
  time: string;
}

export interface Endpoint {
  ID?: number;
  identity?: number;
  namespace?: string;
  labels?: string[];
  pod_name?: string;
  workloads?: { name: string; kind: string }[];
}

export interface PolicyRef {
  name: string;
  namespace?: string;
  kind: string;
  labels?: string[];
}

export interface Flow {
  time: string;
  uuid: string;
  verdict: string;
  drop_reason_desc?: string;
  IP?: { source: string; destination: string };
  l4?: {
    TCP?: { source_port?: number; destination_port?: number; flags?: Record<string, boolean> };
    UDP?: { source_port?: number; destination_port?: number };
    ICMPv4?: { type?: number; code?: number };
  };
  source?: Endpoint;
  destination?: Endpoint;
  Type: string;
  node_name?: string;
  source_names?: string[];
  destination_names?: string[];
  l7?: {
    type: string;
    latency_ns?: string;
    http?: { code?: number; method?: string; url?: string };
    dns?: { query?: string; rcode?: number; ips?: string[] };
  };
  traffic_direction?: string;
  is_reply?: boolean;
  Summary?: string;
  egress_allowed_by?: PolicyRef[];
  ingress_allowed_by?: PolicyRef[];
  egress_denied_by?: PolicyRef[];
  ingress_denied_by?: PolicyRef[];
}

export interface Query {
  namespace: string; // "*" for all
  exclude: string[];
  filters: string[];
  window: number; // seconds
}

export function queryString(q: Query): string {
  const p = new URLSearchParams();
  p.set("ns", q.namespace);
  if (q.exclude.length) p.set("exclude", q.exclude.join(","));
  for (const f of q.filters) p.append("filter", f);
  p.set("window", String(q.window));
  return p.toString();
}

// A policy as the page names it, with its rule where the agent says which
// (its labels `fibril:io.fibril.policy.rule` and `.entry`).
export function policyName(p: PolicyRef): string {
  const label = (key: string) =>
    p.labels?.find((l) => l.startsWith(key + "="))?.slice(key.length + 1);
  const rule = label("fibril:io.fibril.policy.rule");
  const entry = label("fibril:io.fibril.policy.entry");
  const where = rule !== undefined && entry !== undefined ? ` rule ${rule} ${entry}` : "";
  return `${p.namespace ? p.namespace + "/" : ""}${p.name} (${p.kind})${where}`;
}

export function endpointText(e: Endpoint | undefined, ip: string | undefined, names?: string[]): string {
  if (e?.pod_name) return `${e.namespace}/${e.pod_name}`;
  if (names && names.length) return names.join(",");
  const reserved = e?.labels?.find((l) => l.startsWith("reserved:"));
  if (reserved && !ip) return reserved;
  return ip ?? "";
}

export function ports(f: Flow): [number, number, string] {
  const l4 = f.l4;
  if (l4?.TCP) return [l4.TCP.source_port ?? 0, l4.TCP.destination_port ?? 0, "TCP"];
  if (l4?.UDP) return [l4.UDP.source_port ?? 0, l4.UDP.destination_port ?? 0, "UDP"];
  if (l4?.ICMPv4) return [0, 0, "ICMPv4"];
  return [0, 0, ""];
}

// The policies that decided a flow, as the table and the detail panel say it.
export function verdictReason(f: Flow): string {
  const denied = [...(f.egress_denied_by ?? []), ...(f.ingress_denied_by ?? [])];
  const allowed = [...(f.egress_allowed_by ?? []), ...(f.ingress_allowed_by ?? [])];
  if (f.verdict === "DROPPED") {
    if (denied.length) return "denied by " + denied.map(policyName).join(", ");
    if (f.drop_reason_desc === "POLICY_DENIED") return "default deny";
    return f.drop_reason_desc ?? "";
  }
  if (allowed.length) return "allowed by " + allowed.map(policyName).join(", ");
  return "";
}

export function l7Text(f: Flow): string {
  const l7 = f.l7;
  if (!l7) return "";
  if (l7.http) {
    const h = l7.http;
    return l7.type === "RESPONSE" ? `HTTP ${h.code ?? ""} ${h.method ?? ""} ${h.url ?? ""}` : `HTTP ${h.method ?? ""} ${h.url ?? ""}`;
  }
  if (l7.dns) return `DNS ${l7.dns.query ?? ""}${l7.type === "RESPONSE" ? " " + (l7.dns.ips ?? []).join(",") : ""}`;
  return l7.type;
}
