{{/* Names, labels and checks shared by every template. */}}

{{- define "sentinel.name" -}}
{{- default .Chart.Name .Values.nameOverride | trunc 63 | trimSuffix "-" -}}
{{- end -}}

{{- define "sentinel.fullname" -}}
{{- if .Values.fullnameOverride -}}
{{- .Values.fullnameOverride | trunc 40 | trimSuffix "-" -}}
{{- else -}}
{{- $name := default .Chart.Name .Values.nameOverride -}}
{{- if contains $name .Release.Name -}}
{{- .Release.Name | trunc 40 | trimSuffix "-" -}}
{{- else -}}
{{- printf "%s-%s" .Release.Name $name | trunc 40 | trimSuffix "-" -}}
{{- end -}}
{{- end -}}
{{- end -}}

{{- define "sentinel.controlPlaneName" -}}{{ include "sentinel.fullname" . }}-controlplane{{- end -}}
{{- define "sentinel.enrollmentName" -}}{{ include "sentinel.fullname" . }}-enrollment{{- end -}}
{{- define "sentinel.agentName" -}}{{ include "sentinel.fullname" . }}-agent{{- end -}}
{{- define "sentinel.serverSecret" -}}{{ .Values.tls.serverSecret | default (printf "%s-server-tls" (include "sentinel.fullname" .)) }}{{- end -}}
{{- define "sentinel.caSecret" -}}{{ .Values.tls.caSecret | default (printf "%s-ca" (include "sentinel.fullname" .)) }}{{- end -}}

{{- define "sentinel.serviceAccountName" -}}
{{- if .Values.serviceAccount.create -}}
{{- .Values.serviceAccount.name | default (include "sentinel.controlPlaneName" .) -}}
{{- else -}}
{{- .Values.serviceAccount.name | default "default" -}}
{{- end -}}
{{- end -}}

{{- define "sentinel.image" -}}
{{- printf "%s:%s" .Values.image.repository (.Values.image.tag | default .Chart.AppVersion) -}}
{{- end -}}

{{- define "sentinel.labels" -}}
helm.sh/chart: {{ printf "%s-%s" .Chart.Name .Chart.Version | replace "+" "_" }}
app.kubernetes.io/name: {{ include "sentinel.name" . }}
app.kubernetes.io/instance: {{ .Release.Name }}
app.kubernetes.io/version: {{ .Chart.AppVersion | quote }}
app.kubernetes.io/managed-by: {{ .Release.Service }}
app.kubernetes.io/part-of: sentinel
{{- end -}}

{{/* Selector labels of one component: pass (list $ "controlplane") or (list $ "agent"). */}}
{{- define "sentinel.selectorLabels" -}}
{{- $root := index . 0 -}}
app.kubernetes.io/name: {{ include "sentinel.name" $root }}
app.kubernetes.io/instance: {{ $root.Release.Name }}
app.kubernetes.io/component: {{ index . 1 }}
{{- end -}}

{{/* The DNS names of the control plane's Services, for its server certificate. */}}
{{- define "sentinel.serviceDnsNames" -}}
{{- $ns := .Release.Namespace -}}
{{- range $svc := list (include "sentinel.controlPlaneName" .) (include "sentinel.enrollmentName" .) }}
- {{ $svc }}
- {{ $svc }}.{{ $ns }}
- {{ $svc }}.{{ $ns }}.svc
- {{ $svc }}.{{ $ns }}.svc.{{ $.Values.clusterDomain }}
{{- end }}
{{- range .Values.tls.extraDnsNames }}
- {{ . }}
{{- end }}
{{- end -}}

{{/* Refuses values that cannot work, with a message saying what to set. */}}
{{- define "sentinel.validate" -}}
{{- $cp := .Values.controlPlane -}}
{{- $db := .Values.database -}}
{{- if and (gt (int $cp.replicas) 1) (ne $db.type "postgresql") -}}
{{- fail (printf "controlPlane.replicas=%d needs PostgreSQL: set database.type=postgresql and database.postgresql.existingSecret (a Secret holding the database URL). SQLite is one file on one pod's volume and works with replicas: 1 only." (int $cp.replicas)) -}}
{{- end -}}
{{- if and (eq $db.type "postgresql") (not $db.postgresql.existingSecret) -}}
{{- fail "database.type=postgresql needs database.postgresql.existingSecret: the name of a Secret whose key database.postgresql.key holds the URL (postgresql://USER:PASSWORD@HOST:5432/DB)" -}}
{{- end -}}
{{- if and .Values.kubernetesExecutor.extraClusters (not .Values.kubernetesExecutor.kubeconfigSecret) -}}
{{- fail "kubernetesExecutor.extraClusters needs kubernetesExecutor.kubeconfigSecret: the Secret holding their kubeconfig files" -}}
{{- end -}}
{{- end -}}

{{/* SENTINEL_KUBERNETES_CLUSTERS: this cluster in-cluster, then any others. */}}
{{- define "sentinel.kubernetesClusters" -}}
{{- $clusters := list (printf "%s=in-cluster" .Values.kubernetesExecutor.clusterName) -}}
{{- $clusters = concat $clusters .Values.kubernetesExecutor.extraClusters -}}
{{- join "," $clusters -}}
{{- end -}}

{{/* A host for host:port: IPv6 literals in brackets. */}}
{{- define "sentinel.hostPort" -}}
{{- if contains ":" . -}}[{{ . }}]{{- else -}}{{ . }}{{- end -}}
{{- end -}}
