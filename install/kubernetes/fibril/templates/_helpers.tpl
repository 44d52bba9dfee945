{{/* Labels every object carries. */}}
{{- define "fibril.labels" -}}
app.kubernetes.io/part-of: fibril
app.kubernetes.io/managed-by: {{ .Release.Service }}
helm.sh/chart: {{ .Chart.Name }}-{{ .Chart.Version }}
{{- end -}}

{{/* An image reference. */}}
{{- define "fibril.image" -}}
{{ .repository }}:{{ .tag }}
{{- end -}}

{{/*
Values that ask for what Fibril does not do are refused with the reason,
before anything is installed (the schema has checked types and names).
*/}}
{{- define "fibril.checks" -}}
{{- $v := .Values -}}
{{- if ne $v.ipam.mode "kubernetes" -}}
{{- fail (printf "ipam.mode=%s: Fibril takes pod addresses from each node's spec.podCIDRs only; set ipam.mode=kubernetes" $v.ipam.mode) -}}
{{- end -}}
{{- if and (eq (toString $v.kubeProxyReplacement) "true") (not $v.devices) -}}
{{- fail "kubeProxyReplacement=true needs devices: the node's interfaces node ports are served on (e.g. devices={eth0})" -}}
{{- end -}}
{{- if $v.cgroup.autoMount.enabled -}}
{{- fail (printf "cgroup.autoMount.enabled=true: Fibril mounts no cgroup2 itself; set cgroup.autoMount.enabled=false and cgroup.hostRoot to the host's cgroup2 mount (now %s)" $v.cgroup.hostRoot) -}}
{{- end -}}
{{- if and $v.hostFirewall.enabled (not $v.devices) -}}
{{- fail "hostFirewall.enabled=true needs devices: the node's interfaces the host firewall watches (e.g. devices={eth0})" -}}
{{- end -}}
{{- if $v.encryption.enabled -}}
{{- fail "encryption.enabled=true: Fibril has no transparent encryption (IPsec/WireGuard) yet" -}}
{{- end -}}
{{- if ne $v.routingMode "tunnel" -}}
{{- fail (printf "routingMode=%s: Fibril routes between nodes through its VXLAN overlay only; set routingMode=tunnel" $v.routingMode) -}}
{{- end -}}
{{- if ne $v.tunnelProtocol "vxlan" -}}
{{- fail (printf "tunnelProtocol=%s: Fibril's overlay is VXLAN only; set tunnelProtocol=vxlan" $v.tunnelProtocol) -}}
{{- end -}}
{{- if not (has $v.cni.chainingMode (list "none" "portmap")) -}}
{{- fail (printf "cni.chainingMode=%s: Fibril chains only with portmap (or none); it is not a plugin in another CNI's chain" $v.cni.chainingMode) -}}
{{- end -}}
{{- if and $v.hubble.tls.enabled $v.hubble.tls.auto.enabled (ne $v.hubble.tls.auto.method "helm") -}}
{{- fail (printf "hubble.tls.auto.method=%s: Fibril's chart makes Hubble's certificates with helm only; set hubble.tls.auto.method=helm" $v.hubble.tls.auto.method) -}}
{{- end -}}
{{- if and $v.hubble.tls.enabled (not $v.hubble.tls.auto.enabled) -}}
{{- fail "hubble.tls.enabled=true with hubble.tls.auto.enabled=false: bring-your-own Hubble certificates are not supported yet; enable hubble.tls.auto" -}}
{{- end -}}
{{- if and $v.hubble.relay.enabled (not $v.hubble.enabled) -}}
{{- fail "hubble.relay.enabled=true needs hubble.enabled=true (the relay reads the agents' Hubble API)" -}}
{{- end -}}
{{- if and $v.hubble.ui.enabled (not $v.hubble.relay.enabled) -}}
{{- fail "hubble.ui.enabled=true needs hubble.relay.enabled=true (the UI reads the relay)" -}}
{{- end -}}
{{- if and (ne $v.hubble.ui.service.type "NodePort") (ne (int $v.hubble.ui.service.nodePort) 31235) -}}
{{- fail "hubble.ui.service.nodePort is used only with hubble.ui.service.type=NodePort" -}}
{{- end -}}
{{- if and (eq $v.hubble.ui.service.type "NodePort") (or (lt (int $v.hubble.ui.service.nodePort) 30000) (gt (int $v.hubble.ui.service.nodePort) 32767)) -}}
{{- fail (printf "hubble.ui.service.nodePort=%v: outside Kubernetes' default NodePort range 30000-32767" $v.hubble.ui.service.nodePort) -}}
{{- end -}}
{{- end -}}
