{{/* Names, labels and the image, shared by every template. */}}

{{- define "shardserve.name" -}}
{{- default .Chart.Name .Values.nameOverride | trunc 63 | trimSuffix "-" -}}
{{- end -}}

{{/* The release's base name; components append -operator / -router (so 54 chars leave room). */}}
{{- define "shardserve.fullname" -}}
{{- if .Values.fullnameOverride -}}
{{- .Values.fullnameOverride | trunc 54 | trimSuffix "-" -}}
{{- else -}}
{{- $name := default .Chart.Name .Values.nameOverride -}}
{{- if contains $name .Release.Name -}}
{{- .Release.Name | trunc 54 | trimSuffix "-" -}}
{{- else -}}
{{- printf "%s-%s" .Release.Name $name | trunc 54 | trimSuffix "-" -}}
{{- end -}}
{{- end -}}
{{- end -}}

{{- define "shardserve.labels" -}}
helm.sh/chart: {{ printf "%s-%s" .Chart.Name .Chart.Version | replace "+" "_" }}
app.kubernetes.io/name: {{ include "shardserve.name" . }}
app.kubernetes.io/instance: {{ .Release.Name }}
app.kubernetes.io/version: {{ .Chart.AppVersion | quote }}
app.kubernetes.io/managed-by: {{ .Release.Service }}
{{- with .Values.commonLabels }}
{{ toYaml . }}
{{- end }}
{{- end -}}

{{/* Selector labels of one component: call with (dict "ctx" $ "component" "router"). */}}
{{- define "shardserve.selectorLabels" -}}
app.kubernetes.io/name: {{ include "shardserve.name" .ctx }}
app.kubernetes.io/instance: {{ .ctx.Release.Name }}
app.kubernetes.io/component: {{ .component }}
{{- end -}}

{{/* The image of the operator and the router: image.tag or appVersion, always the CPU
build (a CUDA build links libcuda and starts only on GPU nodes). */}}
{{- define "shardserve.image" -}}
{{- printf "%s:%s" .Values.image.repository (default .Chart.AppVersion .Values.image.tag) -}}
{{- end -}}

{{/* The image of the worker pods: the same version, "-cuda" for the cuda flavor. */}}
{{- define "shardserve.workerImage" -}}
{{- include "shardserve.image" . -}}
{{- if eq .Values.image.flavor "cuda" -}}-cuda{{- end -}}
{{- end -}}

{{- define "shardserve.operator.serviceAccountName" -}}
{{- if .Values.operator.serviceAccount.create -}}
{{- default (printf "%s-operator" (include "shardserve.fullname" .)) .Values.operator.serviceAccount.name -}}
{{- else -}}
{{- default "default" .Values.operator.serviceAccount.name -}}
{{- end -}}
{{- end -}}

{{- define "shardserve.router.serviceAccountName" -}}
{{- if .Values.router.serviceAccount.create -}}
{{- default (printf "%s-router" (include "shardserve.fullname" .)) .Values.router.serviceAccount.name -}}
{{- else -}}
{{- default "default" .Values.router.serviceAccount.name -}}
{{- end -}}
{{- end -}}

{{/* Role or ClusterRole, by watchNamespace. */}}
{{- define "shardserve.watchRoleKind" -}}
{{- if .Values.watchNamespace -}}Role{{- else -}}ClusterRole{{- end -}}
{{- end -}}

{{/* The volumes every pod of the chart mounts: a writable /tmp on a read-only root. */}}
{{- define "shardserve.tmpVolume" -}}
- name: tmp
  emptyDir:
    medium: Memory
    sizeLimit: 64Mi
{{- end -}}

{{/* A metrics scraper ({namespace, podLabels}) as a NetworkPolicy peer; namespace "" or "*": every namespace. */}}
{{- define "shardserve.scraperPeer" -}}
- namespaceSelector:
    {{- if and .namespace (ne .namespace "*") }}
    matchLabels:
      kubernetes.io/metadata.name: {{ .namespace }}
    {{- else }} {}
    {{- end }}
  podSelector:
    {{- with .podLabels }}
    matchLabels:
      {{- toYaml . | nindent 6 }}
    {{- else }} {}
    {{- end }}
{{- end -}}

{{/* The same scraper as the operator's flag value, NAMESPACE:key=value,... */}}
{{- define "shardserve.scraperFlag" -}}
{{- $pairs := list -}}
{{- range $k, $v := .podLabels -}}{{- $pairs = append $pairs (printf "%s=%s" $k $v) -}}{{- end -}}
{{- printf "%s:%s" (default "*" .namespace) (join "," $pairs) -}}
{{- end -}}

{{/* The worker pods the operator makes, in the watched namespace or any: the routers' and the operator's gRPC peers. */}}
{{- define "shardserve.workerPeer" -}}
- namespaceSelector:
    {{- if .Values.watchNamespace }}
    matchLabels:
      kubernetes.io/metadata.name: {{ .Values.watchNamespace }}
    {{- else }} {}
    {{- end }}
  podSelector:
    matchLabels:
      app.kubernetes.io/name: shardserve
      app.kubernetes.io/component: worker
      app.kubernetes.io/managed-by: shardserve-operator
{{- end -}}

{{/* Egress both control-plane components need: DNS anywhere, and the API server. */}}
{{- define "shardserve.controlPlaneEgress" -}}
- ports:
    - {protocol: UDP, port: 53}
    - {protocol: TCP, port: 53}
- ports:
    {{- range .Values.networkPolicy.apiServer.ports }}
    - {protocol: TCP, port: {{ . }}}
    {{- end }}
  {{- with .Values.networkPolicy.apiServer.cidr }}
  to:
    - ipBlock: {cidr: {{ . }}}
  {{- end }}
{{- end -}}
